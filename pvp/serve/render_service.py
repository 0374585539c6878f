"""The server's renderer, without sockets: validated requests in, encoded frames out, in batches."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pvp import __version__
from pvp.avatar import Avatar
from pvp.serve.graphs import BucketRenderer, buckets_up_to, graphs_unavailable
from pvp_contract import controls, protocol

log = logging.getLogger(__name__)


@dataclass
class FrameJob:
    """One frame to render: validated controls, edits and output options."""

    controls: list[float]
    edits: dict[str, float]
    format: str
    size: int | None
    quality: int


def encode(rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    """HxWx3 uint8 -> the wire payload of a format."""
    if fmt == "rgb8":
        return np.ascontiguousarray(rgb).tobytes()
    if fmt == "rgba8":
        rgba = np.empty(rgb.shape[:2] + (4,), np.uint8)
        rgba[..., :3] = rgb
        rgba[..., 3] = 255
        return rgba.tobytes()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", bgr, params)
    if not ok:
        raise RuntimeError(f"encoding a {fmt} frame failed")
    return buf.tobytes()


def resize(rgb: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or size == rgb.shape[0]:
        return rgb
    interp = cv2.INTER_AREA if size < rgb.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


class RenderService:
    """``graphs``: render through CUDA graphs per batch bucket (pvp.serve.graphs); None: when the avatar is on
    a CUDA device. Otherwise the avatar renders each batch eagerly at its own size."""

    def __init__(self, avatar: Avatar, dtype: torch.dtype = torch.float32, max_batch: int = 16,
                 graphs: bool | None = None):
        self.avatar = avatar
        self.dtype = dtype
        self.max_batch = max_batch
        use_graphs = graphs_unavailable(avatar.device) is None if graphs is None else graphs
        self.graphs = BucketRenderer(avatar, dtype, buckets_up_to(max_batch), graphs=True) if use_graphs else None
        self.num_channels = len(avatar.meta.schema["channels"])
        self.names = controls.channel_names(avatar.meta.schema)
        self.lo, self.hi = controls.ranges(avatar.meta.schema)
        self.edit_index = {n: i for i, n in enumerate(avatar.edit_names)}

    def info(self) -> dict:
        m = self.avatar.meta
        return {"v": protocol.VERSION, "type": "info", "server": f"pvp {__version__}",
                "avatar": {"id": m.id, "name": m.name, "resolution": m.resolution, "control_schema": m.schema,
                           "expression_stats": {"mean": m.stats.mean, "std": m.stats.std},
                           "edits": m.edits, "expression_maps": m.expression_maps,
                           "has_face_model": self.avatar.face_model is not None},
                "limits": {"max_batch": self.max_batch, "max_sequence": protocol.MAX_SEQUENCE,
                           "min_size": protocol.MIN_SIZE, "max_size": protocol.MAX_SIZE,
                           "formats": list(protocol.FORMATS), "max_message_bytes": protocol.MAX_MESSAGE_BYTES}}

    def face_mesh(self) -> dict:
        """The avatar's face model as a mesh for client rigs (FLAME frame: X right, Y up, Z towards the
        camera; interocular distance 1): mean vertices, triangles, and per expression channel the vertex
        offsets of +1 sd. Arrays are little-endian float32 / int32 bytes."""
        fm = self.avatar.face_model
        if fm is None:
            raise protocol.ProtocolError(protocol.INVALID_FIELD, "this avatar has no face model "
                                         "(info.avatar.has_face_model is false)", "type")
        k = controls.expression_dim(self.avatar.meta.schema)
        offsets = fm.components[:k] * fm.scales[:k, None, None]
        return {"v": protocol.VERSION, "type": "face_mesh", "vertex_count": int(fm.mean.shape[0]),
                "vertices": fm.mean.astype("<f4").tobytes(),
                "triangles": self.avatar.triangles().astype("<i4").tobytes(),
                "shape_keys": {n: o.astype("<f4").tobytes() for n, o in zip(controls.expression_names(k), offsets)}}

    def clamped(self, values: list[float]) -> list[str]:
        """The channels a request sets beyond the learned range (the renderer clamps them): the client's cue
        that the avatar has saturated."""
        v = np.asarray(values, np.float32)
        return [self.names[i] for i in np.flatnonzero((v < self.lo - 1e-4) | (v > self.hi + 1e-4))]

    def check_edits(self, edits: dict[str, float]) -> None:
        """Avatar-specific check of a request's edits (the protocol module checked types, bounds and the
        control count)."""
        unknown = sorted(set(edits) - set(self.edit_index))
        if unknown:
            raise protocol.ProtocolError(protocol.INVALID_FIELD, f"unknown edit directions {unknown}", "edits")

    def controls_tensor(self, jobs: list[FrameJob]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctrl = np.array([j.controls for j in jobs], np.float32)  # the avatar clamps them to its ranges
        edits = None
        if self.edit_index:
            edits = torch.zeros(len(jobs), len(self.edit_index))
            for row, job in enumerate(jobs):
                for name, strength in job.edits.items():
                    edits[row, self.edit_index[name]] = strength
        return torch.from_numpy(ctrl), edits

    def render_rgb(self, jobs: list[FrameJob]) -> np.ndarray:
        """[N, R, R, 3] uint8, in batches of at most max_batch."""
        out = []
        for start in range(0, len(jobs), self.max_batch):
            ctrl, edits = self.controls_tensor(jobs[start:start + self.max_batch])
            if self.graphs is not None:
                out.append(self.graphs.render_uint8(ctrl, edits))
            else:
                out.append(self.avatar.render_uint8(ctrl, edits, self.dtype))
        return np.concatenate(out)

    def render(self, jobs: list[FrameJob]) -> list[tuple[int, int, bytes]]:
        """-> (width, height, payload) per job."""
        frames = self.render_rgb(jobs)
        out = []
        for job, rgb in zip(jobs, frames):
            rgb = resize(rgb, job.size)
            out.append((rgb.shape[1], rgb.shape[0], encode(rgb, job.format, job.quality)))
        return out

    def warm_up(self) -> None:
        if self.graphs is not None:  # captures every bucket's graph before the first request
            self.graphs.warm_up()
        job = FrameJob(controls.defaults(self.avatar.meta.schema), {}, "rgb8", None, 90)
        self.render([job] * min(self.max_batch, 2))

