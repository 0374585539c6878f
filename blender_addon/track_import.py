"""Import FLAME Track without bpy: a driving performance -> keyframes per rig channel, timing kept.

A take keeps its source frame numbers: source frame n lands on scene frame
``start_frame + (n - first) * scene_fps / source_fps`` (one scene frame per source frame when the frame
rate is unknown or resampling is off), so a stride-2 track keys every other frame and frames without a
face stay gaps — never a shift of what follows. Across a gap the value is held (the key before it is
constant) or interpolated, the user's choice. With resampling, each run of frames between gaps is keyed on
every scene frame it spans. Optional smoothing (a Gaussian over time, within each run) and decimation
(dropping keys that linear interpolation between their neighbours reproduces within a tolerance) happen
here too; the file itself is the raw take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pvp_contract import controls, driving

GAPS = ("HOLD", "INTERPOLATE")
# decimation tolerances: below what a render can show (degrees for head and jaw, sd for expressions)
DECIMATE_DEG = 0.05
DECIMATE_SD = 0.005


def decimation_tolerance(name: str) -> float:
    return DECIMATE_SD if controls.expression_index(name) is not None else DECIMATE_DEG


@dataclass
class KeyTable:
    names: list[str]  # control channels, in column order
    frames: np.ndarray  # [N] scene frame numbers (integers as floats)
    values: np.ndarray  # [N, len(names)] control values (the schema's units)
    hold_after: np.ndarray  # [N] bool: a gap follows this key, hold its value across it
    source_fps: float | None  # the take's frame rate (from the file or given), None when unknown
    notes: list[str] = field(default_factory=list)

    @property
    def frame_range(self) -> tuple[int, int]:
        return int(self.frames[0]), int(self.frames[-1])

    def channel_keys(self, j: int, decimated: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames, values and hold flags of column j: every key, or only those decimation keeps (the keys
        on both sides of a gap always stay)."""
        values = self.values[:, j]
        if not decimated or len(values) < 3:
            return self.frames, values, self.hold_after
        edges = self.hold_after | np.concatenate([[False], self.hold_after[:-1]])
        keep = decimate(self.frames, values, decimation_tolerance(self.names[j]), edges)
        return self.frames[keep], values[keep], self.hold_after[keep]


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian of ``sigma`` frames along axis 0 (edges held), for one run of consecutive frames."""
    if sigma <= 0 or len(values) < 2:
        return values
    radius = max(1, math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, ((radius, radius), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], 1)


def decimate(frames: np.ndarray, values: np.ndarray, tolerance: float, keep: np.ndarray | None = None) -> np.ndarray:
    """Mask of the keys of one channel to write: the first and last, every ``keep`` key (gap edges), and
    each key that the straight line between the kept neighbours misses by more than ``tolerance``
    (Ramer-Douglas-Peucker on the value)."""
    mask = np.zeros(len(frames), bool) if keep is None else keep.copy()
    mask[[0, -1]] = True
    anchors = np.flatnonzero(mask)
    stack = list(zip(anchors[:-1], anchors[1:]))
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        inner = np.arange(a + 1, b)
        line = values[a] + (values[b] - values[a]) * (frames[inner] - frames[a]) / (frames[b] - frames[a])
        worst = int(np.argmax(np.abs(values[inner] - line)))
        if abs(values[inner][worst] - line[worst]) > tolerance:
            mask[inner[worst]] = True
            stack += [(a, inner[worst]), (inner[worst], b)]
    return mask


def layout_keys(source_frames: np.ndarray, run_id: np.ndarray, values: np.ndarray, start_frame: int,
                first_source_frame: int, ratio: float, smoothing: float = 0.0):
    """Scene frames [N], values [N, C] and hold flags [N] of the keys: ``source_frames`` [M] (valid frames),
    ``run_id`` [M] (frames with equal ids have no gap between them), ``ratio`` scene frames per source frame."""
    frames, out, hold = [], [], []
    runs = np.unique(run_id)
    for k, run in enumerate(runs):
        sel = run_id == run
        t = start_frame + (source_frames[sel] - first_source_frame) * ratio
        step = float(np.median(np.diff(source_frames[sel]))) if sel.sum() > 1 else 1.0
        v = smooth(values[sel], smoothing / ratio / step)  # sigma in samples of this run
        if ratio != 1:
            grid = np.arange(math.ceil(t[0] - 1e-9), math.floor(t[-1] + 1e-9) + 1, dtype=np.float64)
            if len(grid) == 0:
                grid = np.array([float(round(t[0]))])
            v = np.stack([np.interp(grid, t, v[:, c]) for c in range(v.shape[1])], 1) if len(t) > 1 else \
                np.repeat(v[:1], len(grid), 0)
            t = grid
        frames.append(t)
        out.append(v)
        flags = np.zeros(len(t), bool)
        flags[-1] = k < len(runs) - 1
        hold.append(flags)
    frames, out, hold = np.concatenate(frames), np.concatenate(out), np.concatenate(hold)
    last = np.append(frames[1:] != frames[:-1], True)  # runs rounded onto one scene frame: the later key wins
    return frames[last], out[last], hold[last]


def key_table(path, schema: dict, groups, renormalize: bool, avatar_stats: dict | None, start_frame: int,
              scene_fps: float, resample: bool = True, source_fps: float = 0.0, smoothing: float = 0.0,
              expression_map: dict | None = None) -> KeyTable:
    """Read a driving file and lay its valid frames out as keys from ``start_frame`` (see the module)."""
    perf = driving.read_performance(path)
    converted = driving.to_controls(perf, schema, groups, renormalize, avatar_stats, expression_map)
    if not converted.columns:
        raise driving.DrivingError(f"{path}: none of the chosen channel groups ({', '.join(groups)}) is in the file")
    names = list(converted.columns)
    values = np.stack([converted.columns[n] for n in names], 1)
    positions = converted.rows
    # a gap: invalid rows between two valid ones, or frame numbers jumping past the take's usual step (tools
    # that leave faceless frames out of their files)
    steps = np.diff(converted.frames)
    usual = float(np.median(steps)) if len(steps) else 1.0
    run_id = np.concatenate([[0], np.cumsum((np.diff(positions) > 1) | (steps > 1.5 * usual))])
    fps = perf.fps or source_fps or None
    ratio = scene_fps / fps if (resample and fps) else 1.0
    frames, values, hold = layout_keys(converted.frames, run_id, values, start_frame, int(perf.frames[0]), ratio,
                                       smoothing)
    notes = list(converted.notes)
    gaps = int(run_id[-1])
    if gaps:
        notes.append(f"{gaps} gap{'s' if gaps > 1 else ''} without a face kept in place")
    return KeyTable(names, frames, values, hold, fps, notes)
