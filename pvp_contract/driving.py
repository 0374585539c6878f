"""Driving performances from FLAME-style track files, in the avatar's control units.

numpy only (no torch, no safetensors package, nothing unpickled beyond plain arrays): the Blender
extension imports it from this package as the server does. Readers:

- pvp track (``.safetensors``, docs/track-format.md);
- DECA / EMOCA codes: an ``.npz`` (or a torch ``.pt``/``.pkl`` dump) holding ``pose`` [N, 6] (global
  axis-angle, jaw axis-angle) and ``exp`` [N, 50], or a folder of per-frame folders with ``pose.npy``
  and ``exp.npy`` (EMOCA's ``save_codes``);
- NHA / video-head-tracker ``.npz``: ``rotation``, ``neck_pose``, ``jaw_pose`` (axis-angle), ``expr``,
  ``frame``; neck and jaw as the tracker optimises them, before its tanh rotation limits, which are
  applied here;
- metrical-tracker (MICA): a ``checkpoint`` folder of per-frame ``NNNNN.frame`` torch pickles,
  ``flame{exp, jaw (6D)}`` and ``opencv{R}``;
- CSV: a header row of control names (``head_yaw`` … ``exp_00`` …), optionally a ``frame`` column.

Every performance keeps its source frame numbers (``frames``; from the file where it has them: pvp
tracks, NHA's ``frame``, a CSV ``frame`` column, EMOCA folder names ``NNNNNN_DDD`` (frame, detection),
metrical-tracker file names), and frames without a face stay in it as invalid rows, so an importer can
keep the timing. Head rotation becomes yaw/pitch/roll in degrees (signs of pvp tracks), jaw axis-angle
becomes opening and lateral angles in degrees. Expressions are in the avatar's own basis (pvp tracks
tracked in the avatar's expression space, CSV ``exp_NN`` columns) or in FLAME's (``expression_basis``):
FLAME coefficient k has nothing to do with the avatar's channel k.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pvp_contract import controls, geometry
from pvp_contract.controls import GROUPS, HEAD, JAW
from pvp_contract.pickle_compat import latin1_bytes, python3_global


class DrivingError(ValueError):
    """A driving file that cannot be read; the message names it."""


@dataclass
class Performance:
    source: str
    kind: str
    fps: float | None  # None when the file does not say
    head: np.ndarray | None  # [N, 3] yaw, pitch, roll (degrees)
    jaw: np.ndarray | None  # [N, 2] opening, lateral (degrees)
    expression: np.ndarray | None  # [N, K]
    valid: np.ndarray  # [N] bool: the file has this frame (a face was found, the tracker processed it)
    frames: np.ndarray | None = None  # [N] source frame numbers (ints, increasing); None: 0, 1, 2, ...
    expression_basis: str = "flame"  # "avatar": coefficient i is the avatar's exp_i; "flame": FLAME's basis
    columns: frozenset[str] | None = None  # the control names the file gives (None: all of its groups)

    def __post_init__(self):
        self.frames = np.arange(len(self.valid)) if self.frames is None else np.asarray(self.frames, np.int64)

    def __len__(self) -> int:
        return len(self.valid)

    def valid_for(self, groups=GROUPS) -> np.ndarray:
        """[N] bool: frames usable for these channel groups (valid, and their values finite): a blank
        expression cell does not drop a head-only import's key."""
        ok = self.valid.copy()
        for group, values in (("head", self.head), ("jaw", self.jaw), ("expression", self.expression)):
            if group in groups and values is not None:
                ok &= np.all(np.isfinite(values), 1)
        return ok


# --- containers ----------------------------------------------------------------------------------------

# pvp track files this reads (docs/track-format.md); 2: the face model's expressions leave the jaw out, which a
# reader of the per-frame arrays need not know
PVP_TRACK_VERSION = 2

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of a safetensors file, read with numpy alone."""
    data = path.read_bytes()
    if len(data) < 8:
        raise DrivingError(f"{path}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise DrivingError(f"{path}: not a safetensors file (header size {size} beyond the file)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        raise DrivingError(f"{path}: not a safetensors file (header is not JSON)") from None
    body = memoryview(data)[8 + size:]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise DrivingError(f"{path}: array {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        arrays[name] = np.frombuffer(body[begin:end], dtype).reshape(entry["shape"])
    return arrays, header.get("__metadata__") or {}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, and torch tensors as numpy arrays (storages read from the
    zip archive). Any other global is refused by name, so nothing in the file can run code."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar")}
    _STORAGES = {"DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
                 "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                 "BoolStorage": "?"}

    def __init__(self, file, archive: zipfile.ZipFile | None, prefix: str, source: Path):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module, name):
        # protocol-2 pickles (torch.save's default) name Python 2 modules: __builtin__.set, copy_reg, ...
        module, name = python3_global(module, name)
        if (module, name) == ("_codecs", "encode"):
            return latin1_bytes
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in self._STORAGES:
            return self._STORAGES[name]
        raise DrivingError(f"{self.source}: refusing to unpickle {module}.{name} (only arrays are read)")

    def persistent_load(self, pid):
        if self.archive is None or not isinstance(pid, tuple) or pid[0] != "storage":
            raise DrivingError(f"{self.source}: unexpected persistent reference in the pickle")
        _, dtype, key = pid[:3]
        if not isinstance(dtype, str):
            raise DrivingError(f"{self.source}: unsupported storage type {dtype!r}")
        return np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """A tensor as a numpy array: a view of its storage that numpy bounds-checks (a file's sizes and strides
    must not reach past the storage)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype.kind not in "biuf":
        raise DrivingError("a tensor whose storage is not a plain numeric array")
    size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0 or len(size) != len(stride):
        raise DrivingError(f"a tensor with offset {offset}, size {size}, stride {stride}")
    item = storage.itemsize
    return np.ndarray(size, storage.dtype, buffer=storage, offset=offset * item,
                      strides=tuple(s * item for s in stride)).copy()


def read_pickle(path: Path):
    """A torch zip file (torch.save) or a plain pickle, holding only arrays, dicts and lists."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    raise DrivingError(f"{path}: a zip file without data.pkl (not a torch.save file)")
                prefix = name[:-len("data.pkl")]
                return _ArrayUnpickler(io.BytesIO(archive.read(name)), archive, prefix, path).load()
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, None, "", path).load()
    except DrivingError:
        raise
    except Exception as e:
        raise DrivingError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# --- conventions ---------------------------------------------------------------------------------------

def head_from_axis_angle(rotation: np.ndarray, neck: np.ndarray | None = None) -> np.ndarray:
    """[N, 3] FLAME global (and neck) axis-angle -> [N, 3] yaw, pitch, roll in degrees."""
    R = geometry.rotation_from_axis_angle(rotation)
    if neck is not None:
        R = R @ geometry.rotation_from_axis_angle(neck)
    return geometry.ypr_from_rotation(R)


def rotation_from_6d(x: np.ndarray) -> np.ndarray:
    """pytorch3d's continuous 6D representation (two rows, Gram-Schmidt) -> [..., 3, 3]."""
    a1, a2 = x[..., :3], x[..., 3:6]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-2)


# video-head-tracker (NHA) optimises unconstrained neck and jaw values and maps them through
# r_min + (tanh(x) + 1) / 2 * (r_max - r_min) per axis (vht/model/flame.py), limits in degrees:
NHA_NECK_LIMITS_DEG = ((-90.0, 90.0), (-60.0, 60.0), (-80.0, 80.0))
NHA_JAW_LIMITS_DEG = ((-5.0, 60.0), (-0.1, 0.1), (-0.1, 0.1))
# its head rotation is in PyTorch3D's camera frame (X left, Y up, Z into the scene; vht/model/tracking.py
# flips OpenCV's X and Y): turning X and Z gives the FLAME camera frame pvp uses (a frontal face: identity)
NHA_TO_FLAME_CAMERA = np.diag([-1.0, 1.0, -1.0])


def nha_limited(raw: np.ndarray, limits_deg) -> np.ndarray:
    """NHA's stored [N, 3] neck or jaw values -> the axis-angle (radians) its FLAME model uses."""
    lo, hi = np.radians(np.asarray(limits_deg, np.float64)).T
    return lo + (np.tanh(raw) + 1) / 2 * (hi - lo)


# --- readers ---------------------------------------------------------------------------------------------

def _as_2d(value, path: Path, name: str, width: int | None = None) -> np.ndarray:
    a = np.asarray(value, np.float64)
    a = a.reshape(1, -1) if a.ndim == 1 else a.reshape(len(a), -1)
    if width is not None and a.shape[1] < width:
        raise DrivingError(f"{path}: {name!r} has {a.shape[1]} values per frame, expected at least {width}")
    return a


def _performance(path: Path, kind: str, fps, head, jaw, expression, frames=None, basis: str = "flame") -> Performance:
    n = len(next(a for a in (head, jaw, expression) if a is not None))
    for name, a in (("head", head), ("jaw", jaw), ("expression", expression)):
        if a is not None and len(a) != n:
            raise DrivingError(f"{path}: {name} has {len(a)} frames, other channels {n}")
    if n == 0:
        raise DrivingError(f"{path}: no frames")
    if frames is not None:
        frames = np.asarray(frames).reshape(-1)
        if len(frames) != n or not np.all(np.isfinite(frames)):
            raise DrivingError(f"{path}: the frame numbers ({len(frames)}) do not match the {n} frames")
        frames = frames.astype(np.int64)
        if np.any(np.diff(frames) <= 0):
            raise DrivingError(f"{path}: frame numbers must increase (frame {int(frames[1:][np.diff(frames) <= 0][0])} "
                               "comes after a later or equal one)")
    return Performance(str(path), kind, fps, head, jaw, expression, np.ones(n, bool), frames, basis)


def _read_pvp_track(path: Path) -> Performance:
    arrays, meta = read_safetensors(path)
    header = json.loads(meta.get("header", "{}"))
    if header.get("format") != "pvp.track":
        raise DrivingError(f"{path}: a safetensors file that is not a pvp track")
    if header.get("version", 0) > PVP_TRACK_VERSION:
        raise DrivingError(f"{path}: pvp track version {header['version']} is newer than this reader "
                           f"({PVP_TRACK_VERSION})")
    perf = _performance(path, "pvp-track", header.get("fps"), arrays["yaw_pitch_roll"].astype(np.float64),
                        controls.jaw_degrees(arrays["jaw_pose"]), arrays["expression"].astype(np.float64),
                        arrays["frame_index"], basis="avatar")
    perf.valid &= arrays["valid"].astype(bool)
    return perf


def _frame_numbers(codes: dict):
    """The source frame numbers a file stores beside its codes (NHA: ``frame``), else None."""
    for key in ("frame", "frame_index", "frame_id"):
        if key in codes and np.ndim(codes[key]) == 1:
            return np.asarray(codes[key])
    return None


def _from_codes(path: Path, kind: str, codes: dict, frames=None) -> Performance:
    frames = frames if frames is not None else _frame_numbers(codes)
    if "pose" in codes and "exp" in codes:  # DECA / EMOCA
        pose = _as_2d(codes["pose"], path, "pose", 6)
        return _performance(path, kind, None, head_from_axis_angle(pose[:, :3]), controls.jaw_degrees(pose[:, 3:6]),
                            _as_2d(codes["exp"], path, "exp"), frames)
    expr_key = "expr" if "expr" in codes else "expression" if "expression" in codes else None
    if "rotation" in codes and "jaw_pose" in codes and expr_key:  # NHA / video-head-tracker
        rot = _as_2d(codes["rotation"], path, "rotation", 3)
        neck = _as_2d(codes["neck_pose"], path, "neck_pose", 3) if "neck_pose" in codes else None
        jaw = _as_2d(codes["jaw_pose"], path, "jaw_pose", 3)
        processed = None
        if "n_processed" in codes:  # video-head-tracker's export: neck and jaw before its rotation limits
            neck = nha_limited(neck, NHA_NECK_LIMITS_DEG) if neck is not None else None
            jaw = nha_limited(jaw, NHA_JAW_LIMITS_DEG)
            rot = geometry.axis_angle_from_rotation(NHA_TO_FLAME_CAMERA @ geometry.rotation_from_axis_angle(rot))
            processed = int(np.asarray(codes["n_processed"]).reshape(-1)[0])
        perf = _performance(path, "nha", None, head_from_axis_angle(rot, neck), controls.jaw_degrees(jaw),
                            _as_2d(codes[expr_key], path, expr_key), frames)
        if processed is not None:  # frames past it were never optimised: their values are initial guesses
            perf.valid[processed:] = False
        return perf
    raise DrivingError(f"{path}: no FLAME codes found (expected 'pose' + 'exp' as DECA/EMOCA, or 'rotation', "
                       f"'jaw_pose', 'expr' as NHA); it holds {sorted(codes)[:12]}")


def _read_npz(path: Path) -> Performance:
    if not zipfile.is_zipfile(path):
        raise DrivingError(f"{path}: not an npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            codes = {k: data[k] for k in data.files}
    except ValueError as e:
        raise DrivingError(f"{path}: not a plain-array npz ({e})") from None
    return _from_codes(path, "deca", codes)


def _read_codes_pickle(path: Path) -> Performance:
    codes = read_pickle(path)
    if not isinstance(codes, dict):
        raise DrivingError(f"{path}: expected a dict of codes, found {type(codes).__name__}")
    return _from_codes(path, "deca", codes)


EMOCA_NAME = re.compile(r"(\d+)(?:_(\d+))?$")  # NNNNNN (frame) or NNNNNN_DDD (frame, detection)


def _read_emoca_folder(path: Path, folders: list[Path]) -> Performance:
    """One code folder per detection; the first detection of each frame is the performance (a second
    face in the shot is not a frame)."""
    numbered = [(EMOCA_NAME.search(f.name), f) for f in folders]
    if all(m is not None for m, _ in numbered):
        first = {}
        for m, f in sorted(numbered, key=lambda x: (int(x[0].group(1)), int(x[0].group(2) or 0))):
            first.setdefault(int(m.group(1)), f)
        frames, folders = list(first), list(first.values())
    else:
        frames = None  # unnumbered folders: one frame each, in name order
    codes = {"pose": [], "exp": []}
    for folder in folders:
        for key in codes:
            try:
                codes[key].append(np.load(folder / f"{key}.npy", allow_pickle=False).reshape(-1))
            except ValueError as e:
                raise DrivingError(f"{folder / f'{key}.npy'}: not a plain array ({e})") from None
    return _from_codes(path, "emoca", {k: np.stack(v) for k, v in codes.items()}, frames)


def _read_metrical_folder(path: Path, frames: list[Path]) -> Performance:
    numbers = [int(m.group(1)) if (m := re.search(r"(\d+)$", f.stem)) else None for f in frames]
    if None not in numbers:
        order = np.argsort(numbers)
        frames, numbers = [frames[i] for i in order], [numbers[i] for i in order]
    jaw, head, expression = [], [], []
    flip = np.diag([1.0, -1.0, -1.0])  # OpenCV camera (Y down, Z forward) -> FLAME camera (Y up, Z to camera)
    for f in frames:
        frame = read_pickle(f)
        try:
            flame, camera = frame["flame"], frame["opencv"]
            expression.append(np.asarray(flame["exp"], np.float64).reshape(-1))
            jaw_R = rotation_from_6d(np.asarray(flame["jaw"], np.float64).reshape(-1)[:6])
            head_R = flip @ np.asarray(camera["R"], np.float64).reshape(3, 3)
        except (KeyError, TypeError, ValueError) as e:
            raise DrivingError(f"{f}: not a metrical-tracker frame ({type(e).__name__}: {e})") from None
        jaw.append(geometry.axis_angle_from_rotation(jaw_R))
        head.append(geometry.ypr_from_rotation(head_R))
    return _performance(path, "metrical-tracker", None, np.array(head), controls.jaw_degrees(np.array(jaw)),
                        np.array(expression), None if None in numbers else numbers)


def _read_csv(path: Path) -> Performance:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DrivingError(f"{path}: a CSV needs a header row and at least one frame")
    names = [n.strip() for n in rows[0]]
    try:
        values = np.array([[float(v) if v.strip() else np.nan for v in r] for r in rows[1:] if r], np.float64)
    except ValueError as e:
        raise DrivingError(f"{path}: {e}") from None
    if values.shape[1] != len(names):
        raise DrivingError(f"{path}: rows have {values.shape[1]} values, the header names {len(names)}")
    col = {n: values[:, i] for i, n in enumerate(names)}

    exp_index = {n: i for n in names if (i := controls.expression_index(n)) is not None}
    exp_names = controls.expression_names(max(exp_index.values()) + 1) if exp_index else []
    col.update({exp_names[i]: col[n] for n, i in exp_index.items()})  # exp_3, exp_003 are exp_03

    def group(wanted):
        present = [n for n in wanted if n in col]
        if not present:
            return None
        return np.stack([col.get(n, np.zeros(len(values))) for n in wanted], 1)
    head, jaw, expression = group(HEAD), group(JAW), group(exp_names) if exp_names else None
    if head is None and jaw is None and expression is None:
        raise DrivingError(f"{path}: no control columns (expected names like head_yaw, jaw_open, exp_00)")
    perf = _performance(path, "csv", None, head, jaw, expression, col.get("frame"), basis="avatar")
    perf.columns = frozenset(n for n in names if n in HEAD or n in JAW) | frozenset(exp_names[i] for i in
                                                                                 exp_index.values())
    return perf


def read_performance(path) -> Performance:
    path = Path(path)
    if path.is_dir():
        emoca = sorted(d for d in path.iterdir() if (d / "pose.npy").is_file() and (d / "exp.npy").is_file())
        if emoca:
            return _read_emoca_folder(path, emoca)
        metrical = sorted(path.glob("*.frame")) or sorted((path / "checkpoint").glob("*.frame"))
        if metrical:
            return _read_metrical_folder(path, metrical)
        raise DrivingError(f"{path}: a folder with neither EMOCA per-frame codes (*/pose.npy, */exp.npy) nor "
                           f"metrical-tracker frames (*.frame)")
    if not path.is_file():
        raise DrivingError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    readers = {".safetensors": _read_pvp_track, ".npz": _read_npz, ".csv": _read_csv, ".pt": _read_codes_pickle,
               ".pth": _read_codes_pickle, ".pkl": _read_codes_pickle}
    if suffix not in readers:
        raise DrivingError(f"{path}: unknown driving file type {suffix!r} (expected .safetensors, .npz, .pt, .pkl, "
                           f".csv or a folder)")
    return readers[suffix](path)


# --- to controls -----------------------------------------------------------------------------------------

def resample(values: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """[N, C] sampled at src_fps -> linearly interpolated at dst_fps over the same duration."""
    n = len(values)
    if n < 2 or abs(src_fps - dst_fps) < 1e-9:
        return values
    count = int(np.floor((n - 1) * dst_fps / src_fps + 1e-9)) + 1  # no sample past the last frame
    t = np.arange(count) * (src_fps / dst_fps)
    return np.stack([np.interp(t, np.arange(n), values[:, c]) for c in range(values.shape[1])], 1)


@dataclass
class DrivingControls:
    """A performance in an avatar's controls: columns [M] by channel name over the valid frames (in
    order), their source frame numbers, and what the conversion left out or changed (one line each)."""

    columns: dict[str, np.ndarray]
    rows: np.ndarray  # [M] the performance's rows these are (its frames usable for the imported groups)
    frames: np.ndarray  # [M] their source frame numbers
    notes: list[str]


def to_controls(perf: Performance, schema: dict, groups=GROUPS, renormalize: bool = False,
                avatar_stats: dict | None = None, expression_map: dict | None = None) -> DrivingControls:
    """The schema's channels in ``groups`` over the performance's valid frames.

    ``renormalize`` maps jaw and expression from the performance's own mean/std to the avatar's
    (``avatar_stats``: {mean, std} over jaw then expression, as info.avatar.expression_stats) — the paper's
    reenactment normalisation (appendix B); channels whose own spread is below their noise floor only
    have their mean moved. FLAME-basis expressions drive the avatar only through ``expression_map``
    (info.avatar.expression_maps.flame, see controls.apply_expression_map); without one they are left
    out, with a note."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown channel groups {sorted(unknown)} (use {', '.join(GROUPS)})")
    notes: list[str] = []
    groups = tuple(groups)
    if "expression" in groups and perf.expression is not None and perf.expression_basis == "flame" \
            and expression_map is None:
        notes.append(f"{Path(perf.source).name}: its expressions are FLAME coefficients, which do not drive "
                     "this avatar's expression channels one to one; imported head and jaw only (an expression "
                     "map from `pvp expression-map` lets them drive the avatar)")
        groups = tuple(g for g in groups if g != "expression")
    keep = perf.valid_for(groups)
    if not keep.any():
        raise DrivingError(f"{perf.source}: no frame with a face (all {len(perf)} frames are invalid)")

    def wanted(group, values):
        return values[keep] if group in groups and values is not None else None

    expression = wanted("expression", perf.expression)
    if expression is not None and perf.expression_basis == "flame":
        expression = controls.apply_expression_map(expression_map, expression)
    out = controls.channel_columns(schema, wanted("head", perf.head), wanted("jaw", perf.jaw), expression)
    if perf.columns is not None:
        out = {n: v for n, v in out.items() if n in perf.columns}
    face = [n for n in out if n not in HEAD]
    if renormalize and face:
        if avatar_stats is None:
            raise ValueError("renormalisation needs the avatar's expression_stats")
        index = [controls.face_stats_index(schema)[n] for n in face]
        floors = [controls.noise_floor(n) for n in face]
        values = np.stack([out[n] for n in face], 1)
        mapped = controls.renormalize(values, np.asarray(avatar_stats["mean"])[index],
                                      np.asarray(avatar_stats["std"])[index], floors)
        out.update({n: mapped[:, j] for j, n in enumerate(face)})
        still = [n for n, f in zip(face, floors) if values[:, face.index(n)].std() < f]
        if still:
            notes.append(f"near-constant in the track, so only re-centred: {', '.join(still)}")
    return DrivingControls(out, np.flatnonzero(keep), perf.frames[keep], notes)
