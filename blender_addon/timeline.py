"""Fast-path timeline render: the server renders every frame of a range into PNG files, no bpy.

Resumable: each file is written under a temporary name and renamed, and a manifest in the folder
(``pvp_frames.json``, :mod:`pvp_contract.frames`) records what each file shows (its controls, edits, size and
avatar); a frame already on disk is kept only when it shows what is asked now, so a resumed render after keys
changed re-renders exactly the frames that changed. Cancellable (the server is told to stop). The operator
steps it from a timer; in background mode it runs to the end.
"""
from __future__ import annotations

import time
from pathlib import Path

from pvp_contract.atomic import write_bytes
from pvp_contract.client import Client, CreditWindow, ServerError, ServerUnavailable
from pvp_contract.frames import frame_key, frame_path, missing, record


def frame_range(start: int, end: int, step: int) -> list[int]:
    """The scene's frame numbers, start to end inclusive (a step below 1 counts as 1)."""
    return list(range(start, end + 1, max(1, step)))


def frames_ahead(current: int, start: int, end: int, step: int, count: int) -> list[int]:
    """The next ``count`` frames playback will show after ``current``, wrapping from end to start."""
    step, span = max(1, step), end - start + 1
    return [start + (current + step * i - start) % span for i in range(1, count + 1)]


Run = tuple[dict, list[tuple[int, list[float]]]]  # edits, then (frame, controls) in order


def runs_of_equal_edits(frames: list[tuple[int, list[float], dict]]) -> list[Run]:
    """(frame, controls, edits) in order -> runs of consecutive frames sharing their edits: one sequence
    request carries one set of edits."""
    runs: list[tuple[dict, list]] = []
    for f, c, e in frames:
        if not runs or runs[-1][0] != e:
            runs.append((e, []))
        runs[-1][1].append((f, c))
    return runs


class TimelineJob:
    def __init__(self, client: Client, frames: list[tuple[int, list[float]]], edits: dict, folder,
                 size: int | None = None, chunk: int = 256, avatar_id: str = ""):
        self.client = client
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.edits, self.size, self.chunk = edits, size, chunk
        self.total = len(frames)
        self.keys = {f: frame_key(c, edits, size, avatar_id) for f, c in frames}
        todo = set(missing(self.folder, self.keys))
        self.todo = [(f, c) for f, c in frames if f in todo]
        self.skipped = self.total - len(self.todo)
        self.written = 0
        self.request: tuple[int, list[int]] | None = None  # sequence id, frame numbers in order
        self.window: CreditWindow | None = None
        self.new_keys: dict[str, str] = {}
        self.last_reply = time.monotonic()
        self.cancelled = False

    @property
    def done(self) -> int:
        return self.skipped + self.written

    @property
    def finished(self) -> bool:
        return self.cancelled or (not self.todo and self.request is None)

    def _start_chunk(self) -> None:
        part, self.todo = self.todo[:self.chunk], self.todo[self.chunk:]
        request_id = self.client.start_sequence([c for _, c in part], edits=self.edits, fmt="png", size=self.size)
        self.request = (request_id, [f for f, _ in part])
        self.window = CreditWindow(self.client, request_id)
        self.last_reply = time.monotonic()

    def step(self, timeout_s: float = 0.05) -> int:
        """Write the frames that arrived (waiting up to timeout_s); returns how many were written."""
        if self.finished:
            return 0
        if self.request is None:
            self._start_chunk()
        request_id, numbers = self.request
        written = 0
        for header, payload in self.client.poll(timeout_s):
            if header.get("id") != request_id:
                continue
            self.last_reply = time.monotonic()
            kind = header.get("type")
            if kind == "error":
                raise ServerError(header)
            if kind == "frame":
                number = numbers[header["seq"]]
                write_bytes(frame_path(self.folder, number), payload or b"")
                self.new_keys[str(number)] = self.keys[number]
                written += 1
                self.window.received()
            elif kind == "done":
                self.request = None
        self.written += written
        if written:
            self._record()
        if self.request is not None and time.monotonic() - self.last_reply > self.client.timeout_s:
            self.client.reconnect()
            self.cancelled = True
            raise ServerUnavailable(f"no frame from {self.client.endpoint} within {self.client.timeout_s:g} s; "
                                    f"{self.done} of {self.total} frames are written (run again to resume)")
        return written

    def _record(self) -> None:
        """Merge the frames written so far into the folder's manifest (several jobs share one folder)."""
        record(self.folder, self.new_keys)

    def cancel(self) -> None:
        if self.request is not None:
            self.client.cancel(self.request[0])
        self.request, self.todo, self.cancelled = None, [], True

    def run(self) -> int:
        while not self.finished:
            self.step(0.2)
        return self.done
