"""`pvp render`: a whole track through the renderer into a PNG folder or a video, resumable."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pvp.avatar import Avatar
from pvp.images import save_png
from pvp.serve.render_service import resize
from pvp.tracking.track import Track
from pvp.video import write_video
from pvp_contract import controls

log = logging.getLogger(__name__)


def driving_controls(avatar: Avatar, track: Track, normalize: str = "auto") -> np.ndarray:
    """Controls for every valid frame of a track; jaw and expression renormalised from the track's own
    statistics to the avatar's (paper, appendix B) when the track drives another person."""
    valid = np.flatnonzero(track.valid)
    ctrl = track.controls(avatar.meta.schema, valid)
    own = Path(track.source).resolve() == Path(avatar.meta.provenance.get("source", "")).resolve()
    if normalize == "on" or (normalize == "auto" and not own):
        face = controls.FACE_COLUMNS
        ctrl[:, face] = controls.renormalize(ctrl[:, face], avatar.meta.stats.mean, avatar.meta.stats.std)
        log.info("jaw and expression renormalised from the driving track to the avatar")
    if own:  # the avatar's own crops are upright already
        ctrl[:, controls.ROLL] = 0.0
    return ctrl


def render_track(avatar_dir, track_path, output, normalize="auto", device="cpu", size=None, batch=16,
                 fps=None, progress=True) -> int:
    avatar = Avatar.load(avatar_dir, device)
    track = Track.load(track_path)
    ctrl = driving_controls(avatar, track, normalize)
    out = Path(output)
    video = out.suffix.lower() in (".mp4", ".avi", ".mov")
    frames_dir = out.with_name(out.name + ".frames") if video else out
    frames_dir.mkdir(parents=True, exist_ok=True)
    paths = [frames_dir / f"frame_{i:06d}.png" for i in range(len(ctrl))]
    todo = [i for i, p in enumerate(paths) if not p.exists()]  # frames already written are kept
    for start in tqdm(range(0, len(todo), batch), desc="render", unit="batch", disable=not progress):
        idx = todo[start:start + batch]
        images = avatar.render_uint8(torch.from_numpy(ctrl[idx]))
        for i, img in zip(idx, images):
            save_png(paths[i], resize(img, size))
    if video:
        write_video(paths, fps or track.fps, out)
    return len(ctrl)
