"""Control vectors from tracks, in an avatar's schema order (degrees for head and jaw)."""
from __future__ import annotations

import numpy as np

from .. import controls
from ..tracking.track import Track


def controls_from_track(track: Track, schema: dict, positions: np.ndarray | None = None) -> np.ndarray:
    """[N, C] float32: head yaw/pitch/roll, jaw open/lateral (degrees), then the schema's expression
    coefficients (the track's leading ones)."""
    pos = np.arange(len(track)) if positions is None else np.asarray(positions)
    k = controls.expression_dim(schema)
    if track.expression.shape[1] < k:
        raise ValueError(f"the track has {track.expression.shape[1]} expression coefficients, the avatar needs {k}")
    return np.concatenate([track.yaw_pitch_roll[pos], np.degrees(track.jaw_pose[pos, :2]),
                           track.expression[pos, :k]], 1).astype(np.float32)
