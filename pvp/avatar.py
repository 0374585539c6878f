"""The avatar bundle (a directory, no pickle) and the renderer: controls (+ edits) -> images.

    avatar.json            format, id, control schema, resolution, statistics, losses, metrics, provenance,
                           edit directions
    generator.safetensors  the personalised generator (pvp generator format)
    mappers.safetensors    pivots + pose and expression mappers (config in the metadata)
    face_model.safetensors canonical mesh, expression basis, jaw reference (the tracker's face model) and the
                           mesh's triangles (so serving the face mesh needs no tracker package)
    edits/NAME.safetensors appearance-edit directions in W+ ([num_ws, w_dim])
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file
from torch import nn

from pvp import __version__
from pvp.checkpoints import CheckpointError, load_generator, save_generator
from pvp.models.generator import Generator, to_uint8
from pvp.models.mappers import (
    JAW_AXES,
    MapperConfig,
    MapperFileError,
    Mappers,
    load_mappers,
    mapper_inputs,
    save_mappers,
)
from pvp.tracking.face_model import FaceModel
from pvp_contract import controls
from pvp_contract.atomic import atomic_path, write_text

FORMAT = "pvp.avatar"
VERSION = 2  # 2: a face model with a jaw basis (older pvp would read its expressions wrong); 1 is read as before


class AvatarError(ValueError):
    """An avatar directory that cannot be loaded; the message names it."""


@dataclass
class ExpressionStats:
    """Per-channel mean and standard deviation of jaw (2, degrees) and expression (K) over the training
    frames: the avatar's side of the reenactment normalisation (paper, appendix B)."""

    mean: list[float]
    std: list[float]

    @classmethod
    def of(cls, values: np.ndarray) -> "ExpressionStats":
        return cls(values.mean(0).tolist(), values.std(0).tolist())


@dataclass
class AvatarMeta:
    schema: dict
    resolution: int
    stats: ExpressionStats
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    name: str = "avatar"
    preset: str = ""
    tracker_backend: str = "mediapipe"
    losses: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    edits: list[dict] = field(default_factory=list)
    expression_maps: dict = field(default_factory=dict)  # basis name -> {weights, bias, ...}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "name": self.name, "resolution": self.resolution,
                "control_schema": self.schema, "expression_stats": {"mean": self.stats.mean, "std": self.stats.std},
                "preset": self.preset, "tracker_backend": self.tracker_backend, "losses": self.losses,
                "metrics": self.metrics, "provenance": self.provenance, "edits": self.edits,
                "expression_maps": self.expression_maps}

    @classmethod
    def read(cls, directory: Path) -> "AvatarMeta":
        """An avatar directory's avatar.json."""
        path = Path(directory) / "avatar.json"
        if not path.is_file():
            raise AvatarError(f"{directory}: not an avatar directory (no avatar.json)")
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise AvatarError(f"{path}: not valid JSON ({e})") from None

    @classmethod
    def from_json(cls, d: dict, source: str) -> "AvatarMeta":
        if d.get("format") != FORMAT:
            raise AvatarError(f"{source}: not a pvp avatar (format {d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise AvatarError(f"{source}: avatar format {d['version']} is newer than this pvp reads ({VERSION})")
        try:
            return cls(schema=d["control_schema"], resolution=int(d["resolution"]),
                       stats=ExpressionStats(**d["expression_stats"]), id=d["id"], name=d.get("name", "avatar"),
                       preset=d.get("preset", ""), tracker_backend=d.get("tracker_backend", ""),
                       losses=d.get("losses", {}), metrics=d.get("metrics", {}), provenance=d.get("provenance", {}),
                       edits=d.get("edits", []), expression_maps=d.get("expression_maps", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise AvatarError(f"{source}: bad avatar.json ({e})") from None


def rotate_images(img: torch.Tensor, roll_deg: torch.Tensor, skip_unrotated: bool = True) -> torch.Tensor:
    """In-plane rotation, clockwise for positive roll, about the image centre (borders: edge pixels). Images
    with roll 0 come back unchanged, whatever else is in the batch. ``skip_unrotated=False`` never reads the
    rolls on the host (no synchronisation: a CUDA graph can capture it)."""
    if skip_unrotated and not torch.any(roll_deg != 0):
        return img
    a = torch.deg2rad(roll_deg.to(img.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid samples the input at theta @ output position: the inverse of the on-screen rotation
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(a)], -1),
                         torch.stack([-sin, cos, torch.zeros_like(a)], -1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    rotated = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where((roll_deg != 0).reshape(-1, 1, 1, 1), rotated, img)


class Avatar(nn.Module):
    """Renderer: controls [B, C] (the schema's order) + edit strengths -> images."""

    def __init__(self, meta: AvatarMeta, generator: Generator, mappers: Mappers, face_model: FaceModel | None,
                 edits: dict[str, torch.Tensor]):
        super().__init__()
        self.meta = meta
        self.generator = generator.eval().requires_grad_(False)
        self.mappers = mappers.eval().requires_grad_(False)
        self.face_model = face_model
        self.face_triangles: np.ndarray | None = None  # [T, 3] int32, read from the bundle
        self.edit_names = list(edits)
        num_ws, w_dim = mappers.cfg.num_ws, mappers.cfg.w_dim
        stacked = torch.stack([edits[n] for n in self.edit_names]) if edits else torch.zeros(0, num_ws, w_dim)
        self.register_buffer("edit_directions", stacked.float())
        self.num_channels = len(meta.schema["channels"])
        lo, hi = controls.ranges(meta.schema)
        self.register_buffer("ctrl_min", torch.from_numpy(lo))
        self.register_buffer("ctrl_max", torch.from_numpy(hi))

    def triangles(self) -> np.ndarray:
        """The face mesh's triangles [T, 3] int32: from the bundle, else from MediaPipe's tessellation."""
        if self.face_triangles is None:
            from pvp.tracking.topology import mesh_triangles

            self.face_triangles = np.asarray(mesh_triangles(), np.int32)
        return self.face_triangles

    @property
    def device(self) -> torch.device:
        return self.edit_directions.device

    def latents(self, ctrl: torch.Tensor, edits: torch.Tensor | None = None) -> torch.Tensor:
        """ctrl [B, C]; edits [B, E] strengths (E = number of edit directions) -> W+ [B, num_ws, w_dim].
        Controls are clamped to the schema's ranges: the region the avatar learned."""
        w, _ = self.mappers(*mapper_inputs(self.clamp(ctrl)))
        if edits is not None and len(self.edit_names):
            w = w + torch.einsum("be,eld->bld", edits.to(self.device, torch.float32), self.edit_directions)
        return w

    def clamp(self, ctrl: torch.Tensor) -> torch.Tensor:
        """Controls [B, C] clamped to the schema's ranges: the region the avatar learned."""
        if ctrl.ndim != 2 or ctrl.shape[1] != self.num_channels:
            raise ValueError(f"controls must be [batch, {self.num_channels}], got {list(ctrl.shape)}")
        return torch.maximum(torch.minimum(ctrl.to(self.device, torch.float32), self.ctrl_max), self.ctrl_min)

    @torch.no_grad()
    def render(self, ctrl: torch.Tensor, edits: torch.Tensor | None = None, dtype=torch.float32,
               capturable: bool = False) -> torch.Tensor:
        """-> [B, 3, R, R] in [-1, 1]; head_roll rotates the image in its plane. ``capturable``: no host
        synchronisation (for CUDA graphs), the same images."""
        ctrl = self.clamp(ctrl)
        img = self.generator.synthesis(self.latents(ctrl, edits), noise_mode="const", dtype=dtype)
        return rotate_images(img, ctrl[:, controls.ROLL].to(img.device), skip_unrotated=not capturable)

    def render_uint8(self, ctrl, edits=None, dtype=torch.float32) -> np.ndarray:
        """-> [B, R, R, 3] uint8."""
        return to_uint8(self.render(ctrl, edits, dtype)).cpu().numpy()

    def edit_vector(self, strengths: dict[str, float]) -> torch.Tensor:
        unknown = sorted(set(strengths) - set(self.edit_names))
        if unknown:
            raise KeyError(f"unknown edit directions {unknown}; this avatar has {self.edit_names}")
        return torch.tensor([[strengths.get(n, 0.0) for n in self.edit_names]])

    # -- files ------------------------------------------------------------------------------------------
    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_generator(self.generator, d / "generator.safetensors")
        save_mappers(self.mappers, d / "mappers.safetensors")
        if self.face_model is not None:
            with atomic_path(d / "face_model.safetensors") as tmp:
                save_np({**self.face_model.arrays(), "face_model.triangles": self.triangles()}, str(tmp))
        (d / "edits").mkdir(exist_ok=True)
        for name, direction in zip(self.edit_names, self.edit_directions):
            with atomic_path(d / "edits" / f"{name}.safetensors") as tmp:
                save_file({"direction": direction.detach().cpu().contiguous()}, str(tmp))
        write_text(d / "avatar.json", json.dumps(self.meta.to_json(), indent=1))

    @classmethod
    def load(cls, directory, device="cpu") -> "Avatar":
        d = Path(directory)
        meta_path = d / "avatar.json"
        meta = AvatarMeta.read(d)
        for name in ("generator.safetensors", "mappers.safetensors"):
            if not (d / name).is_file():
                raise AvatarError(f"{d}: {name} is missing")
        try:
            generator = load_generator(d / "generator.safetensors")
            mappers = load_mappers(d / "mappers.safetensors")
        except (CheckpointError, MapperFileError) as e:
            raise AvatarError(str(e)) from None
        cfg = mappers.cfg
        if (cfg.num_ws, cfg.w_dim) != (generator.num_ws, generator.cfg.w_dim) or \
                generator.cfg.resolution != meta.resolution:
            raise AvatarError(f"{d}: generator.safetensors ({generator.cfg.resolution} px, {generator.num_ws} x "
                              f"{generator.cfg.w_dim} W+) does not belong with this avatar's mappers ({cfg.num_ws} x "
                              f"{cfg.w_dim}) and avatar.json ({meta.resolution} px)")
        face_arrays = load_np(str(d / "face_model.safetensors")) if (d / "face_model.safetensors").is_file() else None
        face_model = FaceModel.from_arrays(face_arrays) if face_arrays is not None else None
        edits = {}
        for e in meta.edits:
            path = d / "edits" / f"{e['name']}.safetensors"
            if not path.is_file():
                raise AvatarError(f"{d}: edit {e['name']!r} is listed in avatar.json but {path} is missing")
            edits[e["name"]] = load_file(str(path))["direction"]
        names, k = controls.channel_names(meta.schema), controls.expression_dim(meta.schema)
        if k != cfg.expression_coefficients or names[:controls.EXPRESSION_COLUMNS.start] != [*controls.HEAD,
                                                                                             *controls.JAW]:
            raise AvatarError(f"{meta_path}: the control schema ({', '.join(names[:6])}, ... {k} expression "
                              "channels) does not match the mappers (head yaw/pitch/roll, jaw open/lateral, "
                              f"{cfg.expression_coefficients} expression coefficients)")
        avatar = cls(meta, generator, mappers, face_model, edits).to(device)
        if face_arrays is not None and "face_model.triangles" in face_arrays:
            avatar.face_triangles = face_arrays["face_model.triangles"].astype(np.int32)
        return avatar


def random_avatar(resolution: int = 64, expression_dim: int = 8, num_pivots: int = 6, seed: int = 0,
                  generator=None) -> Avatar:
    """A tiny random but complete avatar (for the server's and Blender's tests): random generator, pivots
    and mappers whose last layers are non-zero, so every control changes the image. ``generator``: another
    GeneratorConfig (e.g. config-f widths, for benchmarks)."""
    from pvp.models.generator import GeneratorConfig

    torch.manual_seed(seed)
    blocks = int(math.log2(resolution)) - 1
    gcfg = generator or GeneratorConfig(resolution=resolution, z_dim=32, w_dim=32, mapping_layers=2,
                                        channels=tuple(max(16, 64 >> max(0, i - 2)) for i in range(blocks)))
    G = Generator(gcfg).eval()
    G.mapping.w_avg.copy_(G.estimate_w_avg())
    cfg = MapperConfig(num_pivots=num_pivots, num_ws=gcfg.num_ws, w_dim=gcfg.w_dim,
                       jaw_expression_dim=JAW_AXES + expression_dim,
                       hidden=32)
    mappers = Mappers(cfg, G.map_z(torch.randn(num_pivots, gcfg.z_dim)))
    for net in [mappers.pose.net, *mappers.expression.nets]:
        torch.nn.init.normal_(net[2].weight, std=0.5)
    stats = ExpressionStats([0.0] * (2 + expression_dim), [1.0] * (2 + expression_dim))
    meta = AvatarMeta(schema=controls.schema(expression_dim, (-30, 30), (-20, 20), (0, 25)), resolution=gcfg.resolution,
                      stats=stats, name=f"random-{seed}", preset="random",
                      provenance={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "pvp_version": __version__, "kind": "random"})
    return Avatar(meta, G, mappers, None, {})
