"""`pvp serve`: a ZeroMQ ROUTER socket in front of a :class:`RenderService`.

One thread does everything: it drains the socket, answers control messages at once, batches live
render requests that arrive within a short window, and between them renders the frames of pending
sequences round-robin, streaming each frame as it is ready. A peer that vanishes (ROUTER_MANDATORY
reports it unreachable) loses its pending work and no one else notices.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from pvp.serve.render_service import FrameJob, RenderService
from pvp_contract import protocol

log = logging.getLogger(__name__)


class ServerConfigError(ValueError):
    pass


@dataclass
class CurveConfig:
    server_secret: Path  # the server's key pair (a .key_secret file from pvp keys)
    clients_dir: Path  # the accepted clients' public keys (.key files)


def is_loopback(endpoint: str) -> bool:
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme in ("ipc", "inproc"):
        return True
    host = (parsed.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Sequence:
    peer: bytes
    request_id: int
    jobs: list[FrameJob]
    first_seq: int
    next: int = 0


@dataclass
class Pending:
    live: list[tuple[bytes, int, FrameJob]] = field(default_factory=list)
    sequences: "OrderedDict[tuple[bytes, int], Sequence]" = field(default_factory=OrderedDict)


class Server:
    def __init__(self, service: RenderService, bind: str = "tcp://127.0.0.1:5555", curve: CurveConfig | None = None,
                 batch_window_s: float = 0.0, context: zmq.Context | None = None):
        if not is_loopback(bind) and curve is None:
            raise ServerConfigError(f"--bind {bind} is not a loopback address: binding there requires CURVE "
                                    "authentication (--curve-secret and --clients, keys from pvp keys)")
        self.service = service
        self.window = batch_window_s
        self.ctx = context or zmq.Context.instance()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        if curve is not None:
            self._setup_curve(curve)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pending = Pending()
        self.running = False
        self.served = 0

    def _setup_curve(self, curve: CurveConfig) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        for path, what in ((curve.server_secret, "--curve-secret"), (curve.clients_dir, "--clients")):
            if not path.exists():
                raise ServerConfigError(f"{what} {path}: not found")
        public, secret = zmq.auth.load_certificate(str(curve.server_secret))
        if secret is None:
            raise ServerConfigError(f"--curve-secret {curve.server_secret}: holds no secret key")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(curve.clients_dir))
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True

    # -- sending ------------------------------------------------------------------------------------
    def _send(self, peer: bytes, header: dict, payload: bytes | None = None) -> bool:
        frames = [peer, protocol.pack(header)] + ([payload] if payload is not None else [])
        try:
            self.sock.send_multipart(frames, copy=False)
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:  # the peer went away: drop what it asked for
                self._forget(peer)
                return False
            raise

    def _forget(self, peer: bytes) -> None:
        self.pending.live = [j for j in self.pending.live if j[0] != peer]
        for key in [k for k in self.pending.sequences if k[0] == peer]:
            del self.pending.sequences[key]
        log.info("client %s went away; its pending work was dropped", peer.hex())

    def _error(self, peer: bytes, err: protocol.ProtocolError, request_id=None) -> None:
        self._send(peer, protocol.error_reply(err.code, err.message, request_id, err.field))

    # -- receiving ----------------------------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        peer = bytes(frames[0])
        if len(frames) != 2:
            self._error(peer, protocol.ProtocolError(protocol.BAD_MESSAGE, "a request is exactly one msgpack frame"))
            return
        raw_id = None
        try:
            msg = protocol.unpack(bytes(frames[1]))
            raw_id = msg.get("id") if isinstance(msg.get("id"), int) and not isinstance(msg.get("id"), bool) else None
            req = protocol.validate_request(msg)
            kind = req["type"]
            if kind == "hello":
                self._send(peer, {**self.service.info(), "id": req["id"]})
            elif kind == "face_mesh":
                self._send(peer, {**self.service.face_mesh(), "id": req["id"]})
            elif kind == "ping":
                self._send(peer, {"v": protocol.VERSION, "type": "pong", "id": req["id"], "time": time.time()})
            elif kind == "cancel":
                removed = self.pending.sequences.pop((peer, req["target"]), None)
                self._send(peer, {"v": protocol.VERSION, "type": "cancelled", "id": req["id"],
                                  "target": req["target"], "found": removed is not None})
            elif kind == "render":
                self.service.check(req["controls"], req["edits"])
                self.pending.live.append((peer, req["id"], _job(req, req["controls"])))
            else:  # render_sequence
                for i, f in enumerate(req["frames"]):
                    self.service.check(f, req["edits"], f"frames[{i}]")
                self.pending.sequences[(peer, req["id"])] = Sequence(
                    peer, req["id"], [_job(req, f) for f in req["frames"]], req["first_seq"])
        except protocol.ProtocolError as e:
            self._error(peer, e, raw_id)

    def _drain(self, timeout_ms: int) -> None:
        """Receive everything waiting (after waiting up to timeout_ms for the first message)."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle([f.bytes if hasattr(f, "bytes") else f for f in frames])

    # -- rendering ----------------------------------------------------------------------------------
    def _render_live(self) -> None:
        deadline = time.perf_counter() + self.window
        while len(self.pending.live) < self.service.max_batch and time.perf_counter() < deadline:
            self._drain(0)
            time.sleep(0.0002)
        self._drain(0)
        batch, self.pending.live = (self.pending.live[:self.service.max_batch],
                                    self.pending.live[self.service.max_batch:])
        results = self._safe_render([job for _, _, job in batch], [(p, i) for p, i, _ in batch])
        for (peer, request_id, job), result in zip(batch, results or []):
            w, h, payload = result
            self._send(peer, protocol.frame_header(request_id, w, h, job.format), payload)
            self.served += 1

    def _render_sequences(self) -> None:
        """Up to one batch of frames, taken round-robin from the pending sequences."""
        picks: list[tuple[Sequence, int]] = []
        while len(picks) < self.service.max_batch and self.pending.sequences:
            progressed = False
            for seq in list(self.pending.sequences.values()):
                if seq.next < len(seq.jobs) and len(picks) < self.service.max_batch:
                    picks.append((seq, seq.next))
                    seq.next += 1
                    progressed = True
            if not progressed:
                break
        results = self._safe_render([s.jobs[i] for s, i in picks], [(s.peer, s.request_id) for s, _ in picks])
        for (seq, i), result in zip(picks, results or []):
            key = (seq.peer, seq.request_id)
            if key not in self.pending.sequences:
                continue  # cancelled, or its peer went away during this batch
            w, h, payload = result
            header = protocol.frame_header(seq.request_id, w, h, seq.jobs[i].format, seq.first_seq + i)
            if self._send(seq.peer, header, payload) and i == len(seq.jobs) - 1:
                self._send(seq.peer, {"v": protocol.VERSION, "type": "done", "id": seq.request_id,
                                      "count": len(seq.jobs)})
                self.pending.sequences.pop(key, None)
            self.served += 1

    def _safe_render(self, jobs, owners):
        try:
            return self.service.render(jobs)
        except Exception as e:  # a render failure must not take the server down
            log.exception("render failed")
            for peer, request_id in dict.fromkeys(owners):
                self._send(peer, protocol.error_reply(protocol.INTERNAL, f"render failed: {type(e).__name__}",
                                                      request_id))
                self.pending.sequences.pop((peer, request_id), None)
            return None

    # -- loop ---------------------------------------------------------------------------------------
    def serve_forever(self, handle_signals: bool = True) -> None:
        self.running = True
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stop())
        log.info("serving %s on %s", self.service.avatar.meta.name, self.endpoint)
        try:
            while self.running:
                busy = self.pending.live or self.pending.sequences
                self._drain(0 if busy else 50)
                if self.pending.live:
                    self._render_live()
                elif self.pending.sequences:
                    self._render_sequences()
        finally:
            self.close()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        log.info("server stopped after %d frames", self.served)


def _job(req: dict, controls: list[float]) -> FrameJob:
    return FrameJob(controls, req["edits"], req["format"], req["size"], req["quality"])
