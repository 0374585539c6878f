"""Import FLAME Track without bpy: a driving performance -> keyframe values per rig channel."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pvp_contract import driving


@dataclass
class KeyTable:
    names: list[str]  # control channels, in column order
    frames: np.ndarray  # [N] scene frame numbers
    values: np.ndarray  # [N, len(names)] control values (the schema's units)


def key_table(path, schema: dict, groups, renormalize: bool, avatar_stats: dict | None, start_frame: int,
              scene_fps: float, resample: bool = True, source_fps: float = 0.0) -> KeyTable:
    """Read a driving file and lay its valid frames out as keys from ``start_frame``: one key per track
    frame, or resampled onto the scene's frame rate when the file (or ``source_fps``) gives the track's."""
    perf = driving.read_performance(path)
    columns = driving.to_controls(perf, schema, groups, renormalize, avatar_stats)
    if not columns:
        raise driving.DrivingError(f"{path}: none of the chosen channel groups ({', '.join(groups)}) is in the file")
    names = list(columns)
    values = np.stack([columns[n] for n in names], 1)
    fps = perf.fps or source_fps
    if resample and fps:
        values = driving.resample(values, fps, scene_fps)
    return KeyTable(names, start_frame + np.arange(len(values), dtype=np.float64), values)
