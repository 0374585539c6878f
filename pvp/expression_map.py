"""`pvp expression-map`: drive the avatar's expression channels from FLAME expression codes.

FLAME coefficient k and the avatar's channel k are unrelated bases. When the avatar's own video was also
tracked by a FLAME tracker (DECA, EMOCA, NHA, metrical-tracker), the two tracks of the same frames give a
linear map from FLAME codes to the avatar's coefficients (ridge least squares); it is stored in
avatar.json under ``expression_maps.flame`` and the server hands it to clients, whose imports of other
FLAME performances then drive expressions through it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pvp.avatar import AvatarError, AvatarMeta
from pvp.tracking.track import Track
from pvp_contract import controls, driving
from pvp_contract.atomic import write_text

MIN_SHARED_FRAMES = 20


def fit_flame_map(avatar_dir: Path, flame_file: Path, own_track: Path | None = None, frame_offset: int = 0) -> dict:
    """Fit and store the map; returns it (with ``frames`` used and per-channel ``r2``). ``frame_offset`` is
    added to the FLAME file's frame numbers to give the video's (0-based) ones: EMOCA numbers the frames
    ffmpeg extracted from 1 (offset -1); a tracker that resampled the video needs its frames re-extracted at
    the video's rate first."""
    meta = AvatarMeta.read(avatar_dir)
    k = controls.expression_dim(meta.schema)
    track_path = own_track or avatar_dir / "work" / "track.safetensors"
    if not track_path.is_file():
        raise AvatarError(f"{track_path}: the avatar's own track is missing (pass --track, the pvp track of the "
                          "avatar's video)")
    own = Track.load(track_path)
    flame = driving.read_performance(flame_file)
    if flame.expression is None or flame.expression_basis != "flame":
        raise driving.DrivingError(f"{flame_file}: holds no FLAME expression codes")
    own_rows = {int(f): i for i, f in enumerate(own.frame_index) if own.valid[i]}
    usable = flame.valid_for(("expression",))
    pairs = [(own_rows[int(f) + frame_offset], j) for j, f in enumerate(flame.frames)
             if usable[j] and int(f) + frame_offset in own_rows]
    if len(pairs) < MIN_SHARED_FRAMES:
        raise driving.DrivingError(f"{flame_file}: only {len(pairs)} of its frames match the avatar's video frames "
                                   f"(need {MIN_SHARED_FRAMES}); track the avatar's own video with the FLAME tracker")
    rows, cols = map(np.array, zip(*pairs))
    source, target = flame.expression[cols], own.expression[rows, :k]
    fitted = controls.fit_expression_map(source, target)
    residual = target - controls.apply_expression_map(fitted, source)
    r2 = 1 - residual.var(0) / np.maximum(target.var(0), 1e-12)
    fitted.update(frames=len(pairs), r2=[round(float(v), 4) for v in r2], source=str(flame_file),
                  frame_offset=frame_offset)
    meta.expression_maps["flame"] = fitted
    write_text(avatar_dir / "avatar.json", json.dumps(meta.to_json(), indent=1))
    return fitted
