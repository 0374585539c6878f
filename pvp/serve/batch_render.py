"""`pvp render`: a whole track (or a timeline the extension wrote) through the renderer into a PNG folder or a
video, resumable; in this process or spread over a Ray cluster (:mod:`pvp.serve.cluster`).

Both paths render with the server's :class:`RenderService` and write frames the same way (atomically, with
the folder's manifest, :mod:`pvp_contract.frames`), so a frame is the same whichever path rendered it, and a
restarted render renders only the frames that are missing or show something else now.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pvp.avatar import Avatar, AvatarError, AvatarMeta
from pvp.serve.render_service import FrameJob, RenderService
from pvp.tracking.track import Track
from pvp.video import write_video
from pvp_contract import controls
from pvp_contract.atomic import write_bytes
from pvp_contract.frames import frame_key, frame_path, missing, record

log = logging.getLogger(__name__)


def driving_controls(avatar: Avatar | AvatarMeta, track: Track, normalize: str = "auto") -> np.ndarray:
    """Controls for every valid frame of a track; jaw and expression renormalised from the track's own
    statistics to the avatar's (paper, appendix B) when the track drives another person."""
    meta = getattr(avatar, "meta", avatar)
    valid = np.flatnonzero(track.valid)
    ctrl = track.controls(meta.schema, valid)
    own = Path(track.source).resolve() == Path(meta.provenance.get("source", "")).resolve()
    if normalize == "on" or (normalize == "auto" and not own):
        face = controls.FACE_COLUMNS
        ctrl[:, face] = controls.renormalize(ctrl[:, face], meta.stats.mean, meta.stats.std)
        log.info("jaw and expression renormalised from the driving track to the avatar")
    if own:  # the avatar's own crops are upright already
        ctrl[:, controls.ROLL] = 0.0
    return ctrl


@dataclass
class Shot:
    """Frames of one avatar, with one set of edits, into one folder: the unit a render is planned in."""

    avatar: Path  # the avatar directory (as every worker sees it)
    frames: list[int]  # frame numbers: the files frame_NNNNNN.png
    controls: np.ndarray  # [len(frames), C]
    folder: Path
    edits: dict[str, float] = field(default_factory=dict)
    size: int | None = None
    avatar_id: str = ""

    def keys(self) -> dict[int, str]:
        return {f: frame_key(c.tolist(), self.edits, self.size, self.avatar_id)
                for f, c in zip(self.frames, self.controls)}

    def todo(self) -> list[int]:
        """Positions (into ``frames``) still to render."""
        todo = set(missing(self.folder, self.keys()))
        return [p for p, f in enumerate(self.frames) if f in todo]


def chunks(shots: list[Shot], batch: int) -> list[tuple[int, list[int]]]:
    """(shot index, positions) of at most ``batch`` frames each, over every frame still to render."""
    out = []
    for i, shot in enumerate(shots):
        todo = shot.todo()
        out += [(i, todo[s:s + batch]) for s in range(0, len(todo), batch)]
    return out


def write_frames(service: RenderService, shot: Shot, positions: list[int]) -> dict[int, str]:
    """Render these frames of a shot in one batch and write them atomically; -> frame -> key, for the
    manifest. The one renderer of every path (this process, each cluster worker)."""
    jobs = [FrameJob(shot.controls[p].tolist(), shot.edits, "png", shot.size, 90) for p in positions]
    for p, (_, _, png) in zip(positions, service.render(jobs)):
        write_bytes(frame_path(shot.folder, shot.frames[p]), png)
    keys = shot.keys()
    return {shot.frames[p]: keys[shot.frames[p]] for p in positions}


def render_shots_here(shots: list[Shot], device="cpu", batch: int = 16, progress: bool = True) -> int:
    """Render what is missing of every shot in this process; -> frames rendered."""
    work = chunks(shots, batch)
    total = sum(len(s.frames) for s in shots)
    services: dict[Path, RenderService] = {}
    with tqdm(total=total, initial=total - sum(len(p) for _, p in work), desc="render", unit="frame",
              disable=not progress) as bar:
        for i, positions in work:
            shot = shots[i]
            if shot.avatar not in services:
                services[shot.avatar] = RenderService(Avatar.load(shot.avatar, device), max_batch=batch)
            record(shot.folder, write_frames(services[shot.avatar], shot, positions))
            bar.update(len(positions))
    return sum(len(p) for _, p in work)


def track_shot(avatar_dir, track_path, folder, normalize="auto", size=None) -> tuple[Shot, Track]:
    """A track's valid frames as one shot (frames numbered 0..N-1)."""
    meta = AvatarMeta.read(Path(avatar_dir))
    track = Track.load(track_path)
    ctrl = driving_controls(meta, track, normalize)
    return Shot(Path(avatar_dir), list(range(len(ctrl))), ctrl, Path(folder), size=size, avatar_id=meta.id), track


def timeline_shots(avatar_dir, timeline_path, folder) -> list[Shot]:
    """The shots of a timeline file (the extension writes it: blender_addon/cluster_job.py): frames with their
    controls and edits, grouped into one shot per set of edits."""
    meta = AvatarMeta.read(Path(avatar_dir))
    try:
        job = json.loads(Path(timeline_path).read_text())
        size, frames = job.get("size"), [(int(f), list(map(float, c)), dict(e)) for f, c, e in job["frames"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AvatarError(f"--timeline {timeline_path}: not a pvp timeline file ({e})") from None
    if job.get("avatar_id") and job["avatar_id"] != meta.id:
        raise AvatarError(f"--timeline {timeline_path}: written for avatar {job['avatar_id']}, but {avatar_dir} is "
                          f"avatar {meta.id}")
    names = {e["name"] for e in meta.edits}
    groups: dict[str, list] = {}
    for f, c, e in frames:
        unknown = sorted(set(e) - names)
        if unknown:
            raise AvatarError(f"--timeline {timeline_path}: frame {f} uses edits {unknown} that {avatar_dir} lacks")
        groups.setdefault(json.dumps(sorted(e.items())), []).append((f, c, e))
    return [Shot(Path(avatar_dir), [f for f, _, _ in g], np.array([c for _, c, _ in g], np.float32), Path(folder),
                 g[0][2], size, meta.id) for g in groups.values()]


def render_track(avatar_dir, track_path, output, normalize="auto", device="cpu", size=None, batch=16,
                 fps=None, progress=True, cluster=None, workers=None) -> int:
    """Render a track into a PNG folder or a video (its frames kept beside it in OUT.frames); ``cluster``
    (auto, local or ray://HOST:PORT) spreads the frames over a Ray cluster. -> the track's frame count."""
    out = Path(output)
    video = out.suffix.lower() in (".mp4", ".avi", ".mov")
    frames_dir = out.with_name(out.name + ".frames") if video else out
    frames_dir.mkdir(parents=True, exist_ok=True)
    shot, track = track_shot(avatar_dir, track_path, frames_dir, normalize, size)
    render_shots([shot], device, batch, progress, cluster, workers)
    if video:
        write_video([frame_path(frames_dir, f) for f in shot.frames], fps or track.fps, out)
    return len(shot.frames)


def render_shots(shots: list[Shot], device="cpu", batch=16, progress=True, cluster=None, workers=None) -> int:
    """In this process, or on a cluster when ``cluster`` names one; -> frames rendered."""
    for shot in shots:
        shot.folder.mkdir(parents=True, exist_ok=True)
    if cluster is None:
        return render_shots_here(shots, device, batch, progress)
    from pvp.serve import cluster as engine

    with engine.connected(cluster):
        return engine.ClusterRender(shots, workers=workers, batch=batch, device=str(device)).run(progress)
