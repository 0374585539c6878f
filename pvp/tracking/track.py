"""The track file: per-frame FLAME-like controls of one video (format documented in docs/track-format.md).

One safetensors file: arrays (no pickle) and a JSON header in its metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pvp.tracking.face_model import FaceModel
from pvp_contract import controls, driving
from pvp_contract.atomic import atomic_path

FORMAT = "pvp.track"
VERSION = driving.PVP_TRACK_VERSION  # 2: a face model with a jaw basis; 1 is read as before
FRAME_ARRAYS = ("frame_index", "valid", "confidence", "landmarks_2d", "landmarks_3d", "rotation", "yaw_pitch_roll",
                "neck_pose", "jaw_pose", "expression", "translation", "scale", "align_quad")


class TrackError(ValueError):
    """A track file that cannot be read; the message names it."""


@dataclass
class Track:
    fps: float
    source: str
    backend: str
    image_size: tuple[int, int]  # width, height
    frame_index: np.ndarray  # [N] frame numbers in the source
    valid: np.ndarray  # [N] bool: a face was found and tracked
    confidence: np.ndarray  # [N] 0..1
    landmarks_2d: np.ndarray  # [N, L, 2] pixels, x right, y down
    landmarks_3d: np.ndarray  # [N, L, 3] pixels in the FLAME frame (X right, Y up, Z towards the camera)
    rotation: np.ndarray  # [N, 3] global head rotation, FLAME axis-angle (radians)
    yaw_pitch_roll: np.ndarray  # [N, 3] degrees (see geometry.py for the signs)
    neck_pose: np.ndarray  # [N, 3] axis-angle; zero: like DECA, the tracker does not split head and neck
    jaw_pose: np.ndarray  # [N, 3] axis-angle (opening about X, lateral about Y)
    expression: np.ndarray  # [N, K] unit-variance coefficients in the face model's expression space
    translation: np.ndarray  # [N, 3] pixels
    scale: np.ndarray  # [N] pixels per canonical unit (interocular distance)
    # [N, 4, 2] FFHQ crop quad (smoothed) in pixels: top-left, bottom-left, bottom-right, top-right
    align_quad: np.ndarray
    face_model: FaceModel | None = None
    events: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame_index)

    def select(self, positions) -> "Track":
        """The same track restricted to some frames (positions or a slice); header and face model kept."""
        return replace(self, **{k: getattr(self, k)[positions] for k in FRAME_ARRAYS})

    def controls(self, schema: dict, positions=None) -> np.ndarray:
        """[N, C] float32 control matrix in the schema's order (all frames, or these positions)."""
        pos = np.arange(len(self)) if positions is None else np.asarray(positions)
        return controls.control_matrix(schema, self.yaw_pitch_roll[pos], controls.jaw_degrees(self.jaw_pose[pos]),
                                       self.expression[pos])

    @property
    def crop_scale(self) -> str:
        """How its crops were sized (tracker.CROP_SCALES); a track from before the setting: FFHQ's per frame."""
        return self.settings.get("crop_scale", "ffhq")

    @property
    def invalid_frames(self) -> list[int]:
        return [int(i) for i in self.frame_index[~self.valid]]

    def header(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "fps": self.fps, "source": self.source, "backend": self.backend,
                "image_size": list(self.image_size), "frames": len(self), "valid_frames": int(self.valid.sum()),
                "invalid_frames": self.invalid_frames, "expression_dim": int(self.expression.shape[1]),
                "events": self.events, "settings": self.settings}

    def save(self, path) -> None:
        arrays = {k: np.ascontiguousarray(getattr(self, k)) for k in FRAME_ARRAYS}
        arrays["valid"] = arrays["valid"].astype(np.uint8)
        if self.face_model is not None:
            arrays.update(self.face_model.arrays())
        arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}
        with atomic_path(Path(path)) as tmp:
            save_file(arrays, str(tmp), metadata={"header": json.dumps(self.header())})

    @classmethod
    def load(cls, path) -> "Track":
        path = Path(path)
        if not path.is_file():
            raise TrackError(f"{path}: no such track file")
        try:
            arrays = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                header = json.loads((f.metadata() or {}).get("header", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise TrackError(f"{path}: not a readable track file ({e})") from None
        if header.get("format") != FORMAT:
            raise TrackError(f"{path}: not a pvp track (format {header.get('format')!r})")
        if int(header.get("version", 0)) > VERSION:
            raise TrackError(f"{path}: track format {header['version']} is newer than this pvp reads ({VERSION})")
        missing = [k for k in FRAME_ARRAYS if k not in arrays]
        if missing:
            raise TrackError(f"{path}: missing arrays {missing}")
        face_model = FaceModel.from_arrays(arrays) if "face_model.mean" in arrays else None
        frame = {k: arrays[k] for k in FRAME_ARRAYS}
        frame["valid"] = frame["valid"].astype(bool)
        return cls(fps=float(header["fps"]), source=header["source"], backend=header["backend"],
                   image_size=tuple(header["image_size"]), face_model=face_model, events=header.get("events", []),
                   settings=header.get("settings", {}), **frame)
