"""`pvp serve`: a ZeroMQ ROUTER socket in front of a :class:`RenderService`.

One thread does everything: it drains the socket, answers control messages at once, batches live
render requests that arrive within a short window, and between them renders the frames of pending
sequences round-robin, streaming each frame as it is ready.

No client can stall or starve the others (docs/protocol.md, "Flow control"): every send is
non-blocking; what ZeroMQ cannot take for a peer waits in that peer's own outbox. A peer's frames are
rendered only while its outbox is empty, at most PER_PEER_FRAMES of them a batch, so a slow reader
pauses its own work and its outbox stays bounded; a peer whose outbox still overflows (a flood of
requests it never reads the replies of) is dropped with its work. Sequences are also credit-based:
frames are rendered only as the client grants credit. Live renders and sequences take turns, and
sequences are served round-robin. Each client may queue a bounded amount of work; beyond it requests
are refused with ``busy``. A peer that vanishes (ROUTER_MANDATORY reports it unreachable, or its
sequence waits for credit longer than SEQUENCE_IDLE_S) loses its pending work.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import time
import urllib.parse
from collections import OrderedDict, deque
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


# Per client. ZeroMQ holds at most PIPE_MESSAGES replies in its pipe to a peer; frames are rendered for a
# peer only while its outbox is empty, PER_PEER_FRAMES at most a batch (live and sequence frames each), so
# its outbox holds at most 2 * PER_PEER_FRAMES frames plus control replies: OUTBOX_BYTES bounds it.
PIPE_MESSAGES = 4
PER_PEER_FRAMES = 4
MAX_FRAME_BYTES = protocol.MAX_SIZE * protocol.MAX_SIZE * 4
OUTBOX_BYTES = 2 * PER_PEER_FRAMES * MAX_FRAME_BYTES + 16 * 1024 * 1024
OUTBOX_MESSAGES = 1024
MAX_SEQUENCES = 4  # pending render_sequence requests of one client
LIVE_PER_BATCH = 4  # pending render requests of one client: this many batches
SEQUENCE_IDLE_S = 120.0  # a sequence waiting this long for credit: its client is gone
MAX_DRAIN = 1000  # requests read before the loop renders again


@dataclass
class Sequence:
    peer: bytes
    request_id: int
    jobs: list[FrameJob]
    first_seq: int
    credit: int
    next: int = 0
    waiting_since: float | None = None  # when its credit ran out


@dataclass
class Peer:
    """What the server holds for one client: its queued work and the replies ZeroMQ could not take yet."""

    live: int = 0  # render requests waiting in the server's live queue
    sequences: int = 0
    outbox: deque = field(default_factory=deque)  # multipart messages, oldest first
    outbox_bytes: int = 0


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
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer is reported, never waited for
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, PIPE_MESSAGES)
        self.sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT; IPv4 addresses bind as before
        if curve is not None:
            self._setup_curve(curve)
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise ServerConfigError(f"--bind {bind}: {e}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pending = Pending()
        self.peers: dict[bytes, Peer] = {}
        self.running = False
        self.served = 0

    def _setup_curve(self, curve: CurveConfig) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not curve.server_secret.is_file():
            raise ServerConfigError(f"--curve-secret {curve.server_secret}: no such file (pvp keys makes one)")
        if not curve.clients_dir.is_dir():
            raise ServerConfigError(f"--clients {curve.clients_dir}: not a folder (it holds the accepted clients' "
                                    ".key files)")
        if not any(curve.clients_dir.glob("*.key")):
            raise ServerConfigError(f"--clients {curve.clients_dir}: holds no .key file, so no client could connect")
        try:
            public, secret = zmq.auth.load_certificate(str(curve.server_secret))
        except (OSError, ValueError) as e:
            raise ServerConfigError(f"--curve-secret {curve.server_secret}: not a key file ({e})") from None
        if secret is None:
            raise ServerConfigError(f"--curve-secret {curve.server_secret}: holds no secret key")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(curve.clients_dir))
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True

    # -- sending ------------------------------------------------------------------------------------
    def _peer(self, peer: bytes) -> Peer:
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = Peer()
        return state

    def _send(self, peer: bytes, header: dict, payload: bytes | None = None) -> bool:
        """Queue a reply; False when the peer is gone (or was just dropped for not reading)."""
        message = [peer, protocol.pack(header)] + ([payload] if payload is not None else [])
        state = self._peer(peer)
        if state.outbox and not self._flush_peer(peer, state):
            return False
        state.outbox.append(message)
        state.outbox_bytes += sum(len(part) for part in message)
        if state.outbox_bytes > OUTBOX_BYTES or len(state.outbox) > OUTBOX_MESSAGES:
            log.warning("client %s stopped reading its replies (%d bytes waiting): dropped with its work",
                        peer.hex(), state.outbox_bytes)
            self._forget(peer)
            return False
        return self._flush_peer(peer, state)

    def _flush_peer(self, peer: bytes, state: Peer) -> bool:
        """Hand the peer's outbox to ZeroMQ until its pipe is full; False when the peer is gone."""
        while state.outbox:
            try:
                self.sock.send_multipart(state.outbox[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # its pipe is full: it is reading slowly, or not at all
                return True
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:  # the peer went away: drop what it asked for
                    self._forget(peer)
                    return False
                raise
            state.outbox_bytes -= sum(len(part) for part in state.outbox.popleft())
        if not (state.live or state.sequences):
            self.peers.pop(peer, None)
        return True

    def _flush(self) -> None:
        for peer, state in list(self.peers.items()):
            if state.outbox:
                self._flush_peer(peer, state)

    def _forget(self, peer: bytes) -> None:
        self.peers.pop(peer, None)
        self.pending.live = [j for j in self.pending.live if j[0] != peer]
        for key in [k for k in self.pending.sequences if k[0] == peer]:
            del self.pending.sequences[key]
        log.info("client %s went away; its pending work was dropped", peer.hex())

    def _error(self, peer: bytes, err: protocol.ProtocolError, request_id=None) -> None:
        self._send(peer, protocol.error_reply(err.code, err.message, request_id, err.field))

    def _end_sequence(self, key: tuple[bytes, int]) -> Sequence | None:
        seq = self.pending.sequences.pop(key, None)
        if seq is not None and key[0] in self.peers:
            self.peers[key[0]].sequences -= 1
        return seq

    # -- receiving ----------------------------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        peer = bytes(frames[0])
        if len(frames) != 2:
            self._error(peer, protocol.ProtocolError(protocol.BAD_MESSAGE, "a request is exactly one msgpack frame"))
            return
        raw_id = None
        try:
            msg = protocol.unpack(bytes(frames[1]))
            raw_id = protocol.request_id(msg)
            req = protocol.validate_request(msg, self.service.num_channels)
            kind, state = req["type"], self._peer(peer)
            if kind == "hello":
                self._send(peer, {**self.service.info(), "id": req["id"]})
            elif kind == "face_mesh":
                self._send(peer, {**self.service.face_mesh(), "id": req["id"]})
            elif kind == "ping":
                self._send(peer, {"v": protocol.VERSION, "type": "pong", "id": req["id"], "time": time.time()})
            elif kind == "credit":
                seq = self.pending.sequences.get((peer, req["target"]))
                if seq is not None:
                    seq.credit, seq.waiting_since = min(seq.credit + req["frames"], len(seq.jobs)), None
                self._send(peer, {"v": protocol.VERSION, "type": "credited", "id": req["id"],
                                  "target": req["target"], "found": seq is not None})
            elif kind == "cancel":
                removed = self._end_sequence((peer, req["target"]))
                self._send(peer, {"v": protocol.VERSION, "type": "cancelled", "id": req["id"],
                                  "target": req["target"], "found": removed is not None})
            elif kind == "render":
                self.service.check_edits(req["edits"])
                if state.live >= LIVE_PER_BATCH * self.service.max_batch:
                    raise protocol.ProtocolError(protocol.BUSY, f"{state.live} frames of this client are waiting "
                                                 "to render; read their replies first")
                self.pending.live.append((peer, req["id"], _job(req, req["controls"])))
                state.live += 1
            else:  # render_sequence
                self.service.check_edits(req["edits"])
                if (peer, req["id"]) in self.pending.sequences:
                    raise protocol.ProtocolError(protocol.INVALID_FIELD, f"id {req['id']} is a sequence of this "
                                                 "client still rendering; ids must be unique", "id")
                if state.sequences >= MAX_SEQUENCES:
                    raise protocol.ProtocolError(protocol.BUSY, f"this client has {state.sequences} sequences "
                                                 f"rendering (at most {MAX_SEQUENCES}); cancel or finish one first")
                credit = len(req["frames"]) if req["credit"] is None else req["credit"]
                self.pending.sequences[(peer, req["id"])] = Sequence(
                    peer, req["id"], [_job(req, f) for f in req["frames"]], req["first_seq"], credit)
                state.sequences += 1
        except protocol.ProtocolError as e:
            self._error(peer, e, raw_id)

    def _drain(self, timeout_ms: int) -> None:
        """Receive everything waiting (after waiting up to timeout_ms for the first message)."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        for _ in range(MAX_DRAIN):  # a flood of requests must not keep the loop from rendering
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle([f.bytes if hasattr(f, "bytes") else f for f in frames])

    # -- rendering ----------------------------------------------------------------------------------
    def _may_render_for(self, peer: bytes) -> bool:
        """Frames are rendered for a peer only once it has taken every reply sent to it."""
        state = self.peers.get(peer)
        return state is not None and not state.outbox

    def _render_live(self) -> None:
        deadline = time.perf_counter() + self.window
        while len(self.pending.live) < self.service.max_batch and time.perf_counter() < deadline:
            self._drain(0)
            time.sleep(0.0002)
        self._drain(0)
        batch, rest, per_peer = [], [], {}
        for entry in self.pending.live:
            peer = entry[0]
            if (len(batch) < self.service.max_batch and self._may_render_for(peer)
                    and per_peer.get(peer, 0) < PER_PEER_FRAMES):
                batch.append(entry)
                per_peer[peer] = per_peer.get(peer, 0) + 1
            else:
                rest.append(entry)
        self.pending.live = rest
        if not batch:
            return
        results = self._safe_render([job for _, _, job in batch], [(p, i) for p, i, _ in batch], sequences=False)
        for (peer, request_id, job), result in zip(batch, results or [None] * len(batch)):
            state = self.peers.get(peer)
            if state is None:
                continue  # dropped during this batch: its replies are moot
            state.live -= 1
            if result is not None:
                w, h, payload = result
                self._send(peer, protocol.frame_header(request_id, w, h, job.format,
                                                       clamped=self.service.clamped(job.controls)), payload)
                self.served += 1

    def _ready(self, seq: Sequence) -> bool:
        """A sequence frame may render: its client granted credit and took every reply already sent."""
        return seq.next < len(seq.jobs) and seq.credit > 0 and self._may_render_for(seq.peer)

    def _render_sequences(self) -> None:
        """Up to one batch of frames: one per ready sequence in turn (round-robin across batches), at most
        PER_PEER_FRAMES per client."""
        picks: list[tuple[Sequence, int]] = []
        per_peer: dict[bytes, int] = {}
        while len(picks) < self.service.max_batch:
            ready = [s for s in self.pending.sequences.values()
                     if self._ready(s) and per_peer.get(s.peer, 0) < PER_PEER_FRAMES]
            if not ready:
                break
            for seq in ready[:self.service.max_batch - len(picks)]:
                picks.append((seq, seq.next))
                seq.next += 1
                seq.credit -= 1
                per_peer[seq.peer] = per_peer.get(seq.peer, 0) + 1
        for seq, _ in picks:  # the next batch starts with the sequences this one did not reach
            key = (seq.peer, seq.request_id)
            if key in self.pending.sequences:
                self.pending.sequences.move_to_end(key)
        if not picks:
            return
        results = self._safe_render([s.jobs[i] for s, i in picks], [(s.peer, s.request_id) for s, _ in picks])
        now = time.monotonic()
        for (seq, i), result in zip(picks, results or []):
            key = (seq.peer, seq.request_id)
            if key not in self.pending.sequences:
                continue  # cancelled, or its peer went away during this batch
            w, h, payload = result
            header = protocol.frame_header(seq.request_id, w, h, seq.jobs[i].format, seq.first_seq + i,
                                           self.service.clamped(seq.jobs[i].controls))
            if self._send(seq.peer, header, payload) and i == len(seq.jobs) - 1:
                self._end_sequence(key)
                self._send(seq.peer, {"v": protocol.VERSION, "type": "done", "id": seq.request_id,
                                      "count": len(seq.jobs)})
            elif seq.credit == 0 and seq.waiting_since is None:
                seq.waiting_since = now
            self.served += 1

    def _expire_idle_sequences(self) -> None:
        """ZeroMQ says nothing when a peer disconnects: a sequence waiting for credit too long is dropped."""
        now = time.monotonic()
        for key, seq in list(self.pending.sequences.items()):
            if seq.waiting_since is not None and now - seq.waiting_since > SEQUENCE_IDLE_S:
                log.warning("sequence %d of client %s got no credit for %.0f s: dropped", seq.request_id,
                            seq.peer.hex(), SEQUENCE_IDLE_S)
                self._end_sequence(key)

    def _safe_render(self, jobs, owners, sequences: bool = True):
        try:
            return self.service.render(jobs)
        except Exception as e:  # a render failure must not take the server down
            log.exception("render failed")
            for peer, request_id in dict.fromkeys(owners):
                if sequences:
                    self._end_sequence((peer, request_id))
                self._send(peer, protocol.error_reply(protocol.INTERNAL, f"render failed: {type(e).__name__}: {e}",
                                                      request_id))
            return None

    # -- loop ---------------------------------------------------------------------------------------
    def serve_forever(self, handle_signals: bool = True) -> None:
        self.running = True
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stop())
        log.info("serving %s on %s", self.service.avatar.meta.name, self.endpoint)
        try:
            live_turn, last_expiry = True, time.monotonic()
            while self.running:
                live = any(self._may_render_for(p) for p, _, _ in self.pending.live)
                sequences = any(self._ready(s) for s in self.pending.sequences.values())
                waiting = any(state.outbox for state in self.peers.values())
                self._drain(0 if live or sequences else 10 if waiting else 50)
                self._flush()
                if live and (live_turn or not sequences):  # live renders and sequences take turns
                    self._render_live()
                elif sequences:
                    self._render_sequences()
                live_turn = not live_turn
                self._flush()
                if time.monotonic() - last_expiry > 1.0:
                    self._expire_idle_sequences()
                    last_expiry = time.monotonic()
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
