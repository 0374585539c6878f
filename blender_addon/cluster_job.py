"""Fast timeline render on a Ray cluster, no bpy.

The extension ships neither torch nor Ray. For a cluster render it writes the timeline (every frame's
controls and edits, as Blender evaluated them) into the output folder and runs pvp beside Blender:

    pvp render AVATAR --timeline OUT/pvp_timeline.json -o OUT --cluster ADDRESS

(pvp installed on this machine with ``pip install 'pvp[cluster]'``, AVATAR and OUT on storage the cluster's
workers see too). pvp writes the frames and the folder's manifest (:mod:`pvp_contract.frames`) as the
server path does, so the progress shown is the manifest's count of frames showing what is asked, a resumed
render keeps what is done, and either path can finish what the other started. Its log goes to
OUT/pvp_render.log; a failure is reported by its last line (pvp prints one line per error). The interactive
preview stays on the ZeroMQ server.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pvp_contract.atomic import write_text
from pvp_contract.frames import frame_key, shown

TIMELINE = "pvp_timeline.json"
LOG = "pvp_render.log"
POLL_S = 0.5  # the manifest is read at most this often


class ClusterRenderError(RuntimeError):
    """pvp could not be started, or the cluster render failed: one line."""


def write_timeline(folder: Path, frames: list[tuple[int, list[float], dict]], size: int | None,
                   avatar_id: str) -> Path:
    """(frame, controls, edits) in order -> the timeline file ``pvp render --timeline`` reads."""
    path = Path(folder) / TIMELINE
    write_text(path, json.dumps({"avatar_id": avatar_id, "size": size,
                                 "frames": [[f, list(c), dict(e)] for f, c, e in frames]}))
    return path


def command(pvp: str, avatar: str, timeline: Path, folder: Path, address: str) -> list[str]:
    return [pvp, "render", str(avatar), "--timeline", str(timeline), "-o", str(folder), "--cluster", address]


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class ClusterJob:
    """One cluster render, with the interface of :class:`~.timeline.TimelineJob` (total, done, finished,
    step, cancel, run), so the operator steps either."""

    def __init__(self, pvp: str, avatar: str, address: str, frames: list[tuple[int, list[float], dict]], folder,
                 size: int | None = None, avatar_id: str = "", popen=subprocess.Popen):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keys = {f: frame_key(c, e, size, avatar_id) for f, c, e in frames}
        self.total = len(frames)
        argv = command(pvp, avatar, write_timeline(self.folder, frames, size, avatar_id), self.folder, address)
        self.log_path = self.folder / LOG
        with open(self.log_path, "w") as log:
            try:
                self.process = popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            except OSError as e:
                raise ClusterRenderError(f"cannot run {pvp!r} ({e.strerror or e}): install pvp beside Blender "
                                         "(pip install 'pvp[cluster]') or set its path in the preferences") from None
        self.done = shown(self.folder, self.keys)
        self.read_at = time.monotonic()
        self.cancelled = False
        self.returncode = None

    @property
    def finished(self) -> bool:
        return self.cancelled or self.returncode is not None

    def step(self, timeout_s: float = 0.05) -> int:
        """Look at the process and (every POLL_S) the manifest; -> frames newly shown as written."""
        if self.finished:
            return 0
        self.returncode = self.process.poll()
        if self.returncode is None and time.monotonic() - self.read_at < POLL_S:
            time.sleep(timeout_s)
            return 0
        before, self.done = self.done, shown(self.folder, self.keys)
        self.read_at = time.monotonic()
        if self.returncode not in (None, 0):
            raise ClusterRenderError(f"{last_line(self.log_path.read_text(errors='replace')) or 'pvp render failed'}"
                                     f" (exit {self.returncode}; {self.log_path}); {self.done} of {self.total} frames "
                                     "are written (run again to resume)")
        return self.done - before

    def cancel(self) -> None:
        if not self.finished:
            self.process.terminate()
            self.process.wait()
        self.cancelled = True

    def run(self) -> int:
        while not self.finished:
            self.step(0.2)
        return self.done
