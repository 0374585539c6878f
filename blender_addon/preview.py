"""Live preview without blocking: the logic behind Blender's frame-change handler and timer, no bpy.

The handler calls :meth:`Preview.want` (a cache hit answers at once; otherwise one non-blocking send);
a timer calls :meth:`Preview.pump`, which reads replies, caches every frame, and returns the frame that
matches what is wanted now — replies for older requests only fill the cache (stale frames are never
shown). No reply within the timeout marks the server down, drops the socket and probes with pings until
the server answers again; then the wanted frame is asked for again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import zmq

from pvp_contract.client import Client, Frame, FrameCache

CONNECTED, WAITING, DOWN = "connected", "waiting", "down"


@dataclass
class Wanted:
    key: tuple
    controls: list[float]
    edits: dict[str, float]


class Preview:
    def __init__(self, client: Client, fmt: str = "rgb8", size: int | None = None, max_in_flight: int = 8,
                 probe_interval_s: float = 1.0, clock=time.monotonic):
        self.client = client
        self.fmt, self.size = fmt, size
        self.max_in_flight = max_in_flight
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.in_flight: dict[int, tuple[tuple, dict, float]] = {}  # id -> (key, request fields, sent at)
        self.wanted: Wanted | None = None
        self.shown: tuple | None = None
        self.state = CONNECTED
        self.message = f"connected to {client.endpoint}"
        self.probe: tuple[int, float] | None = None  # ping id, sent at
        self.dropped_stale = 0
        self.clamped: tuple[str, ...] = ()  # channels the shown frame asked beyond the avatar's range

    # -- requests -----------------------------------------------------------------------------------------
    def key(self, controls, edits) -> tuple:
        return FrameCache.key(controls, edits, self.fmt, self.size)

    def want(self, controls, edits: dict | None = None) -> Frame | None:
        """Ask for the frame of these values; returns it when cached (show it now), else None."""
        edits = dict(edits or {})
        key = self.key(controls, edits)
        self.wanted = Wanted(key, [float(v) for v in controls], edits)
        frame = self.client.cache.get(key)
        if frame is not None:
            self.shown, self.clamped = key, frame.clamped
            return frame
        if self.state != DOWN and not any(k == key for k, _, _ in self.in_flight.values()):
            self._send(key, self.wanted.controls, edits)
        return None

    def prefetch(self, values) -> int:
        """Send requests for uncached (controls, edits) pairs ahead of playback; returns how many went out."""
        sent = 0
        pending = {k for k, _, _ in self.in_flight.values()}
        for controls, edits in values:
            if self.state == DOWN or len(self.in_flight) >= self.max_in_flight:
                break
            key = self.key(controls, edits)
            if key in pending or self.client.cache.get(key) is not None:
                continue
            self._send(key, [float(v) for v in controls], dict(edits or {}))
            pending.add(key)
            sent += 1
        return sent

    def _send(self, key, controls, edits) -> None:
        fields = {"controls": controls, "format": self.fmt}
        if edits:
            fields["edits"] = edits
        if self.size is not None:
            fields["size"] = self.size
        try:
            request_id = self.client.send("render", **fields)
        except zmq.ZMQError as e:
            self.mark_down(f"cannot send to {self.client.endpoint}: {e}")
            return
        self.in_flight[request_id] = (key, fields, self.clock())
        if self.state == CONNECTED:
            self.state = WAITING

    # -- replies --------------------------------------------------------------------------------------------
    def pump(self, timeout_s: float = 0.0) -> Frame | None:
        """Handle every waiting reply; the newest frame matching ``wanted`` (to show), or None."""
        show = None
        try:
            replies = self.client.poll(timeout_s)
        except zmq.ZMQError as e:
            self.mark_down(f"connection to {self.client.endpoint} failed: {e}")
            return None
        except Exception as e:  # a corrupt reply must not stop the preview
            self.message = f"bad reply from {self.client.endpoint}: {e}"
            replies = []
        for header, payload in replies:
            frame = self._reply(header, payload)
            if frame is not None:
                show = frame
        now = self.clock()
        if self.state == DOWN:
            self._probe(now)
        elif self.in_flight and now - min(t for _, _, t in self.in_flight.values()) > self.client.timeout_s:
            self.mark_down(f"no reply from {self.client.endpoint} within {self.client.timeout_s:g} s"
                           " — is pvp serve running?")
        elif not self.in_flight and self.state == WAITING:
            self.state = CONNECTED
        return show

    def _reply(self, header: dict, payload: bytes | None) -> Frame | None:
        request_id, kind = header.get("id"), header.get("type")
        if kind == "pong" and self.probe and request_id == self.probe[0]:
            self._up()
            return None
        entry = self.in_flight.pop(request_id, None)
        if entry is None:
            return None  # a reply from before a reconnection
        key = entry[0]
        if kind == "error":
            self.message = f"server error: {header.get('code')}: {header.get('message')}"
            return None
        if kind != "frame":
            return None
        if self.state != DOWN:
            self.state, self.message = CONNECTED, f"connected to {self.client.endpoint}"
        frame = Frame(request_id, header["width"], header["height"], header["format"], payload or b"",
                      clamped=tuple(header.get("clamped", ())))
        self.client.cache.put(key, frame)
        if self.wanted is not None and key == self.wanted.key:
            self.shown, self.clamped = key, frame.clamped
            return frame
        self.dropped_stale += 1
        return None

    # -- connection state -------------------------------------------------------------------------------------
    def mark_down(self, message: str) -> None:
        self.state, self.message = DOWN, message
        self.in_flight.clear()
        self.probe = None
        self.client.reconnect()

    def _probe(self, now: float) -> None:
        if self.probe is not None and now - self.probe[1] < self.probe_interval_s:
            return
        if self.probe is not None:  # the last ping got no answer: start from a fresh socket
            self.client.reconnect()
        try:
            self.probe = (self.client.send("ping"), now)
        except zmq.ZMQError:
            self.probe = (-1, now)

    def _up(self) -> None:
        self.state, self.message = CONNECTED, f"connected to {self.client.endpoint} (reconnected)"
        self.probe = None
        if self.wanted is not None and self.client.cache.get(self.wanted.key) is None:
            self._send(self.wanted.key, self.wanted.controls, self.wanted.edits)

    def uncached(self, values) -> list:
        """The (controls, edits) pairs the cache does not hold (what scrubbing would have to wait for)."""
        return [(c, e) for c, e in values if self.client.cache.get(self.key(c, dict(e or {}))) is None]

    @property
    def idle(self) -> bool:
        return not self.in_flight and (self.wanted is None or self.shown == self.wanted.key)

    @property
    def settled(self) -> bool:
        """Nothing more will arrive for now: the wanted frame is shown, or the server is down."""
        return self.idle or self.state == DOWN


def pixels_rgba(frame: Frame) -> np.ndarray:
    """A frame's rgb8/rgba8 payload -> float32 RGBA rows bottom-up (Blender's image.pixels layout)."""
    channels = 3 if frame.format == "rgb8" else 4
    rgb = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, channels)
    out = np.ones((frame.height, frame.width, 4), np.float32)
    out[..., :channels] = rgb[::-1] / np.float32(255.0)
    return out.ravel()
