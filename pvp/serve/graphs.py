"""Rendering in fixed batch sizes (buckets), replayed from one CUDA graph per bucket on a GPU.

A batch of n frames renders as the smallest bucket >= n, its rows padded with copies of the last one; the
first n frames come back. Each bucket's graph is captured on first use (or by ``warm_up``) from
Avatar.render with ``capturable=True``: mappers, edits, synthesis, roll and the uint8 conversion in one
replay, then one copy to pinned host memory. A graph reads the generator's prepared tensors
(SynthesisNetwork.prepared): when those are rebuilt (a parameter or buffer changed) every graph is
captured again. Without CUDA the same buckets render eagerly (``graphs=False``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pvp.avatar import Avatar
from pvp.models.generator import PreparedSynthesis, to_uint8

log = logging.getLogger(__name__)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, then max_batch: (1, 2, 4, 8, 16) for 16, (1, 2, 4, 8, 12) for 12."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return (*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n frames."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} frames exceed the largest batch bucket ({buckets[-1]})")


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, ...] -> [rows, ...], the last row repeated (padding frames are valid requests)."""
    return torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])]) if rows > len(t) else t


def graphs_unavailable(device: torch.device) -> str | None:
    """Why CUDA graphs cannot run on ``device``, or None when they can."""
    if not torch.cuda.is_available():
        return "CUDA graphs need CUDA, which this machine does not have"
    if device.type != "cuda":
        return f"CUDA graphs need the avatar on a CUDA device, it is on {device}"
    return None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ctrl: torch.Tensor  # static inputs and output of the graph
    edits: torch.Tensor | None
    frames: torch.Tensor
    host: torch.Tensor  # pinned
    prepared: PreparedSynthesis  # what the graph reads (kept alive with it)


class BucketRenderer:
    """controls [n, C] (+ edit strengths [n, E]) -> [n, R, R, 3] uint8, through the batch buckets."""

    def __init__(self, avatar: Avatar, dtype: torch.dtype = torch.float32, buckets: tuple[int, ...] = (1, 2, 4, 8, 16),
                 graphs: bool | None = None):
        reason = graphs_unavailable(avatar.device)
        if graphs and reason:
            raise ValueError(reason)
        self.avatar, self.dtype, self.buckets = avatar, dtype, tuple(buckets)
        self.graphs = reason is None if graphs is None else graphs
        self._captured: dict[int, _Captured] = {}

    def frames(self, ctrl: torch.Tensor, edits: torch.Tensor | None) -> torch.Tensor:
        """The renderer's output on the device: [B, R, R, 3] uint8, no host synchronisation."""
        return to_uint8(self.avatar.render(ctrl, edits, self.dtype, capturable=True))

    def render_uint8(self, ctrl: torch.Tensor, edits: torch.Tensor | None = None) -> np.ndarray:
        n = len(ctrl)
        bucket = bucket_for(n, self.buckets)
        ctrl = pad_rows(ctrl, bucket)
        edits = pad_rows(edits, bucket) if edits is not None else None
        if self.graphs:
            try:
                return self._replay(bucket, ctrl, edits)[:n].copy()
            except RuntimeError as e:  # a capture the device refused: the same frames, eagerly
                log.warning("CUDA graph capture failed (%s); rendering without graphs", e)
                self.graphs = False
                self._captured.clear()
        return self.frames(ctrl, edits)[:n].cpu().numpy()

    def warm_up(self) -> None:
        """Render (and on a GPU capture) every bucket once."""
        for b in self.buckets:
            self.render_uint8(self.avatar.ctrl_min.expand(b, -1), self._no_edits(b))

    def _no_edits(self, rows: int) -> torch.Tensor | None:
        n = len(self.avatar.edit_names)
        return torch.zeros(rows, n, device=self.avatar.device) if n else None

    def _replay(self, bucket: int, ctrl: torch.Tensor, edits: torch.Tensor | None) -> np.ndarray:
        prepared = self.avatar.generator.synthesis.prepared(self.dtype)
        if any(c.prepared is not prepared for c in self._captured.values()):
            self._captured.clear()  # the generator changed: every graph reads stale tensors
        c = self._captured.get(bucket) or self._capture(bucket, prepared)
        self._captured[bucket] = c
        c.ctrl.copy_(ctrl, non_blocking=True)
        if c.edits is not None:
            c.edits.copy_(edits, non_blocking=True)
        c.graph.replay()
        c.host.copy_(c.frames, non_blocking=True)
        torch.cuda.current_stream(c.frames.device).synchronize()
        return c.host.numpy()

    def _capture(self, bucket: int, prepared: PreparedSynthesis) -> _Captured:
        device = self.avatar.device
        ctrl = self.avatar.ctrl_min.expand(bucket, -1).clone()
        edits = self._no_edits(bucket)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN's choices, the allocator's pools
            for _ in range(2):
                self.frames(ctrl, edits)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            frames = self.frames(ctrl, edits)
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        log.info("captured a CUDA graph for batch %d (%s)", bucket, self.dtype)
        return _Captured(graph, ctrl, edits, frames, host, prepared)
