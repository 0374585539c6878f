"""Client of the pvp render server: pure Python (pyzmq + msgpack), shared with the Blender add-on.

- ``Client.call`` / ``render``: blocking, with a timeout; a timed-out socket is replaced (lazy pirate),
  so a restarted server is reached again without the caller doing anything.
- ``Client.send`` + ``Client.poll``: non-blocking, for Blender's timers; replies carry the request id.
- a bounded frame cache keyed by the quantised controls, edits and output options.
- ``render_sequence``: streamed frames, cancellable, flow-controlled by credit (the server sends at
  most a window of frames ahead of the reading; :class:`CreditWindow` grants more as frames are read).
  A timeline over several GPUs is rendered on Ray (``pvp render --cluster``), not by this client.
"""
from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from pvp_contract import protocol


class ServerUnavailable(ConnectionError):
    """No reply within the timeout (server down, busy or unreachable)."""


class ServerError(RuntimeError):
    """The server answered with an error reply."""

    def __init__(self, reply: dict):
        super().__init__(f"{reply.get('code')}: {reply.get('message')}"
                         + (f" (field {reply['field']})" if reply.get("field") else ""))
        self.reply = reply


@dataclass
class Frame:
    request_id: int
    width: int
    height: int
    format: str
    data: bytes
    seq: int | None = None
    clamped: tuple[str, ...] = ()  # channels the server clamped to the avatar's range for this frame


@dataclass
class CurveKeys:
    server_public: Path  # the server's .key file
    client_secret: Path  # this client's .key_secret file


def quantise(values, step: float = 1e-3) -> tuple:
    return tuple(int(math.floor(v / step + 0.5)) for v in values)


class FrameCache:
    """LRU of encoded frames keyed by quantised controls + edits + output options."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple, Frame] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def key(controls, edits: dict | None, fmt: str, size: int | None) -> tuple:
        return quantise(controls), tuple(sorted((edits or {}).items())), fmt, size

    def get(self, key) -> Frame | None:
        frame = self.items.get(key)
        if frame is not None:
            self.items.move_to_end(key)
        return frame

    def put(self, key, frame: Frame) -> None:
        if key in self.items:
            self.bytes -= len(self.items.pop(key).data)
        self.items[key] = frame
        self.bytes += len(frame.data)
        while self.bytes > self.max_bytes and self.items:
            _, old = self.items.popitem(last=False)
            self.bytes -= len(old.data)


class CreditWindow:
    """The client's side of a sequence's flow control: the server sends at most ``size`` frames ahead of
    what was granted; each half window read is granted back."""

    def __init__(self, client: "Client", request_id: int, size: int = protocol.DEFAULT_CREDIT):
        self.client, self.request_id, self.size = client, request_id, size
        self.unacknowledged = 0

    def received(self, frames: int = 1) -> None:
        self.unacknowledged += frames
        if self.unacknowledged >= max(1, self.size // 2) and self.client.grant(self.request_id, self.unacknowledged):
            self.unacknowledged = 0  # a grant that could not be sent goes out with the next one


def _reply(frames: list[bytes]) -> tuple[dict, bytes | None]:
    header = protocol.unpack(frames[0])
    return header, frames[1] if len(frames) > 1 else None


class Client:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout_s: float = 5.0, curve: CurveKeys | None = None,
                 cache_bytes: int = 256 * 1024 * 1024, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        self.ctx = context or zmq.Context.instance()
        self.ids = itertools.count(1)
        self.cache = FrameCache(cache_bytes)
        self.sock: zmq.Socket | None = None
        self.info: dict | None = None
        self._connect()

    # -- socket ----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT and IPv6 hosts; IPv4 endpoints connect as before
        if self.curve is not None:
            server_public, _ = zmq.auth.load_certificate(str(self.curve.server_public))
            public, secret = zmq.auth.load_certificate(str(self.curve.client_secret))
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        sock.connect(self.endpoint)
        self.sock = sock

    def reconnect(self) -> None:
        """Drop the socket (and every request in flight) and connect a fresh one."""
        if self.sock is not None:
            self.sock.close(linger=0)
        self._connect()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    # -- non-blocking ----------------------------------------------------------------------------------
    def send(self, kind: str, **fields) -> int:
        request_id = next(self.ids)
        self.sock.send(protocol.request(kind, request_id, **fields), zmq.NOBLOCK)
        return request_id

    def poll(self, timeout_s: float = 0.0) -> list[tuple[dict, bytes | None]]:
        """Every reply waiting now (after waiting up to timeout_s for the first)."""
        out = []
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return out
        while True:
            try:
                out.append(_reply(self.sock.recv_multipart(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    # -- blocking ----------------------------------------------------------------------------------------
    def _wait(self, request_id: int, timeout_s: float | None = None) -> tuple[dict, bytes | None]:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                self.reconnect()
                raise ServerUnavailable(f"no reply from {self.endpoint} within {self.timeout_s:g} s")
            header, payload = _reply(self.sock.recv_multipart())
            if header.get("id") == request_id:
                if header.get("type") == "error":
                    raise ServerError(header)
                return header, payload  # replies to older requests (timed out, stale) are dropped

    def call(self, kind: str, **fields) -> tuple[dict, bytes | None]:
        return self._wait(self.send(kind, **fields))

    def hello(self) -> dict:
        self.info, _ = self.call("hello")
        return self.info

    def face_mesh(self) -> dict:
        """The avatar's face mesh (see RenderService.face_mesh); a ServerError when it has none."""
        reply, _ = self.call("face_mesh")
        return reply

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.call("ping")
        return time.perf_counter() - t0

    def render(self, controls, edits: dict | None = None, fmt: str = "rgb8", size: int | None = None,
               quality: int = 90, use_cache: bool = True) -> Frame:
        key = FrameCache.key(controls, edits, fmt, size)
        if use_cache and (hit := self.cache.get(key)) is not None:
            return hit
        fields = {"controls": [float(v) for v in controls], "format": fmt, "quality": quality}
        if edits:
            fields["edits"] = {k: float(v) for k, v in edits.items()}
        if size is not None:
            fields["size"] = int(size)
        header, payload = self.call("render", **fields)
        frame = Frame(header["id"], header["width"], header["height"], header["format"], payload or b"",
                      clamped=tuple(header.get("clamped", ())))
        self.cache.put(key, frame)
        return frame

    def start_sequence(self, frames, edits: dict | None = None, fmt: str = "rgb8", size: int | None = None,
                       quality: int = 90, first_seq: int = 0, credit: int = protocol.DEFAULT_CREDIT) -> int:
        """Send a render_sequence request; returns its id (read the frames with :meth:`stream`, or poll and
        grant credit with a :class:`CreditWindow` of the same ``credit``)."""
        fields = {"frames": [[float(v) for v in f] for f in frames], "format": fmt, "quality": quality,
                  "first_seq": first_seq, "credit": credit}
        if edits:
            fields["edits"] = {k: float(v) for k, v in edits.items()}
        if size is not None:
            fields["size"] = int(size)
        return self.send("render_sequence", **fields)

    def stream(self, request_id: int, count: int, credit: int = protocol.DEFAULT_CREDIT):
        """Yield the count Frame objects (with seq) of a sequence as they arrive, granting credit as they
        are read; closing the generator early cancels the rest on the server."""
        remaining = count
        window = CreditWindow(self, request_id, credit)
        try:
            while remaining:
                header, payload = self._wait(request_id)
                if header["type"] == "frame":
                    remaining -= 1
                    window.received()
                    yield Frame(request_id, header["width"], header["height"], header["format"], payload or b"",
                                header.get("seq"), tuple(header.get("clamped", ())))
            self._wait(request_id)  # the closing "done"
        finally:
            if remaining:
                self.cancel(request_id)

    def render_sequence(self, frames, **options):
        credit = options.get("credit", protocol.DEFAULT_CREDIT)
        return self.stream(self.start_sequence(frames, **options), len(frames), credit)

    def grant(self, target: int, frames: int) -> bool:
        """Let the server send ``frames`` more frames of sequence ``target``; False when it could not be sent."""
        try:
            self.send("credit", target=target, frames=frames)
        except zmq.ZMQError:
            return False
        return True

    def cancel(self, target: int) -> None:
        try:
            self.send("cancel", target=target)
        except zmq.ZMQError:
            pass

