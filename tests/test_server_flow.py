"""The server under clients that misbehave: one that never reads its replies, floods, oversized or
half-wrong requests. None of them may stall, starve or slow the others, and each gets a precise error."""
import math
import os
import stat
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from pvp.serve.process import ServerProcess
from pvp_contract import protocol
from pvp_contract.client import Client, ServerError

CHANNELS = 9  # the conftest avatar: 5 head/jaw channels + 4 expression coefficients


def _controls(i: int) -> list[float]:
    return [float(math.sin(i + k)) * 10 for k in range(CHANNELS)]


def _hog(endpoint: str) -> zmq.Socket:
    """A client that sends and never reads."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock


def _exchange(endpoint: str, message: bytes, timeout_ms: int = 10000) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(message)
    assert sock.poll(timeout_ms), "no reply"
    reply = protocol.unpack(sock.recv_multipart()[0])
    sock.close(linger=0)
    return reply


@pytest.fixture
def server(avatar_dir):
    srv = ServerProcess(avatar_dir)
    yield srv
    assert srv.stop() == 0, srv.stderr()[-2000:]  # SIGTERM ends it cleanly, whatever its clients did


def test_a_client_that_never_reads_cannot_stall_the_others(server):
    baseline = server.rss_bytes()
    hog = _hog(server.endpoint)
    for i in range(4):  # what used to block the server thread in send, for everyone, for good
        hog.send(protocol.request("render_sequence", 1000 + i, frames=[_controls(f) for f in range(4096)],
                                  format="rgba8", size=512))
    for i in range(3000):
        hog.send(protocol.request("hello", 10 + i))
    for i in range(200):
        hog.send(protocol.request("render", 5000 + i, controls=_controls(i), format="rgba8", size=512))
    fuzzer = _hog(server.endpoint)
    for i in range(200):
        fuzzer.send(bytes([i % 256]) * (i + 1))
    good = Client(server.endpoint, timeout_s=30)
    pings = [good.ping() for _ in range(20)]
    frames = list(good.render_sequence([_controls(i) for i in range(40)], size=64))
    assert [f.seq for f in frames] == list(range(40))  # the good client's stream is whole and in order
    reference = Client(server.endpoint, timeout_s=30).render(_controls(7), size=64, use_cache=False)
    assert frames[7].data == reference.data
    # liveness, not speed: every ping answered (Client.ping raises when no reply comes within its timeout)
    # while the hog sits on its replies; bench/server.py measures the latency itself
    assert len(pings) == 20
    grown = server.rss_bytes() - baseline
    assert grown < 256 * 1024 * 1024, f"server grew by {grown / 2**20:.0f} MiB for one client that never reads"
    hog.close(linger=0)
    fuzzer.close(linger=0)
    good.ping()


def test_a_slow_reader_gets_every_frame_of_its_sequences(server):
    client = Client(server.endpoint, timeout_s=30)
    ids = [client.start_sequence([_controls(i) for i in range(48)], size=64, credit=4) for _ in range(2)]
    from pvp_contract.client import CreditWindow

    windows = {i: CreditWindow(client, i, 4) for i in ids}
    got = {i: [] for i in ids}
    deadline = time.monotonic() + 60
    while any(len(v) < 48 for v in got.values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # reads late, a few frames at a time
        for header, _ in client.poll(0.2):
            if header["type"] == "frame" and header["id"] in got:
                got[header["id"]].append(header["seq"])
                windows[header["id"]].received()
    assert all(v == list(range(48)) for v in got.values())


def test_sequences_stop_at_their_credit_until_granted(server):
    client = Client(server.endpoint, timeout_s=30)
    request_id = client.start_sequence([_controls(i) for i in range(30)], size=32, credit=5)
    seen = []
    end = time.monotonic() + 3
    while time.monotonic() < end:
        seen += [h["seq"] for h, _ in client.poll(0.2) if h["type"] == "frame"]
    assert seen == list(range(5))  # exactly the credit, then nothing
    client.grant(request_id, 25)
    end = time.monotonic() + 30
    while len(seen) < 30 and time.monotonic() < end:
        seen += [h["seq"] for h, _ in client.poll(0.2) if h["type"] == "frame"]
    assert seen == list(range(30))


def test_work_queued_by_one_client_is_bounded(server):
    client = Client(server.endpoint, timeout_s=30)
    ids = [client.start_sequence([_controls(i) for i in range(100)], size=32, credit=1) for _ in range(5)]
    replies = []
    end = time.monotonic() + 3
    while time.monotonic() < end:
        replies += client.poll(0.2)
    refused = [h for h, _ in replies if h["type"] == "error"]
    assert [h["id"] for h in refused] == [ids[4]] and refused[0]["code"] == protocol.BUSY
    assert "at most 4" in refused[0]["message"]


def test_oversized_lists_are_refused_with_the_request_id(server):
    client = Client(server.endpoint, timeout_s=30)
    with pytest.raises(ServerError, match=r"invalid_field: frames must be a list of 1..4096"):
        client.call("render_sequence", frames=[[0.0] * CHANNELS] * 17000)
    with pytest.raises(ServerError, match=r"invalid_field: edits must be a map of at most 256"):
        client.call("render", controls=[0.0] * CHANNELS, edits={f"e{i}": 0.0 for i in range(300)})


def test_a_wrong_control_count_is_refused_before_any_value_is_read(server):
    frames = [[1.0] * 1000 for _ in range(800)]  # about 7 MB of numbers
    frames[-1][-1] = float("nan")  # were values read first, this would be the error
    reply = _exchange(server.endpoint, protocol.request("render_sequence", 3, frames=frames))
    assert reply["id"] == 3 and reply["field"] == "frames[0]"
    assert "has 1000 values; this avatar takes 9" in reply["message"]


@pytest.mark.parametrize("version", [1.0, True, "1"])
def test_only_the_integer_1_is_version_1(server, version):
    reply = _exchange(server.endpoint, msgpack.packb({"v": version, "type": "ping", "id": 4}))
    assert reply["type"] == "error" and reply["code"] == protocol.UNSUPPORTED_VERSION and reply["id"] == 4


def test_undecodable_messages_are_explained(server):
    reply = _exchange(server.endpoint, msgpack.packb({"v": 1}) + b"\xc1")
    assert reply["code"] == protocol.BAD_MESSAGE and reply["message"].startswith("not a msgpack message (")
    assert len(reply["message"]) > len("not a msgpack message (ExtraData)")  # the reason, not just a class name


def test_sigterm_stops_the_server_while_a_client_does_not_read(avatar_dir):
    srv = ServerProcess(avatar_dir)
    hog = _hog(srv.endpoint)
    for i in range(2000):
        hog.send(protocol.request("render", i, controls=_controls(i), format="rgba8", size=256))
    Client(srv.endpoint, timeout_s=30).ping()
    srv.proc.terminate()
    assert srv.proc.wait(20) == 0
    hog.close(linger=0)


def test_pvp_keys_keeps_the_secret_key_private(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pvp.cli", "keys", str(tmp_path / "keys"), "studio"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    secret = tmp_path / "keys" / "studio.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "studio.key").st_mode) & 0o044  # the public one is readable


def test_soak_good_clients_keep_working_beside_a_slow_reader_and_a_fuzzer(server):
    """Bounded soak (seconds, loopback): several good clients render and ping while one client reads late
    and another sends junk; every good reply is correct and the server's memory stays bounded."""
    baseline = server.rss_bytes()
    slow, fuzzer = Client(server.endpoint, timeout_s=30), _hog(server.endpoint)
    slow_id = slow.start_sequence([_controls(i) for i in range(4096)], fmt="rgba8", size=512, credit=64)
    goods = [Client(server.endpoint, timeout_s=30) for _ in range(3)]
    rng = np.random.default_rng(0)
    expected, renders = {}, 0
    for _ in range(60):  # bounded by count (a few seconds on 2 cores)
        fuzzer.send(rng.bytes(int(rng.integers(1, 300))))
        for c in goods:
            i = int(rng.integers(0, 20))
            frame = c.render(_controls(i), size=32, use_cache=False)
            expected.setdefault(i, frame.data)
            assert frame.data == expected[i]  # the same request, the same pixels, whoever else is connected
            c.ping()  # answered, or ServerUnavailable
            renders += 1
        slow.poll(0)  # reads now and then, grants nothing
    assert renders == 180 and len(expected) <= 20  # every request answered; repeats were compared
    assert server.rss_bytes() - baseline < 256 * 1024 * 1024
    slow.cancel(slow_id)


def _serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvp.cli", "serve", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(r: subprocess.CompletedProcess, *expected: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert all(e in line for e in expected), line


def test_bad_server_inputs_are_one_clear_line(avatar_dir, tmp_path):
    import shutil

    from pvp.avatar import random_avatar

    broken = tmp_path / "broken"
    shutil.copytree(avatar_dir, broken)
    data = (broken / "mappers.safetensors").read_bytes()
    (broken / "mappers.safetensors").write_bytes(data[:len(data) // 2])
    _one_line_error(_serve(broken), "mappers.safetensors", "not a readable pvp mapper file")
    mixed = tmp_path / "mixed"
    shutil.copytree(avatar_dir, mixed)
    random_avatar(resolution=64, expression_dim=4).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "generator.safetensors", mixed / "generator.safetensors")
    _one_line_error(_serve(mixed), "generator.safetensors", "does not belong with this avatar")
    _one_line_error(_serve(avatar_dir, "--max-batch", "0"), "--max-batch", "must be at least 1")
    keys = tmp_path / "keys"
    assert subprocess.run([sys.executable, "-m", "pvp.cli", "keys", keys, "server"]).returncode == 0
    (tmp_path / "nobody").mkdir()
    for clients, why in ((keys / "server.key", "not a folder"), (tmp_path / "nobody", "holds no .key file")):
        _one_line_error(_serve(avatar_dir, "--bind", "tcp://127.0.0.1:*", "--curve-secret", keys / "server.key_secret",
                               "--clients", clients), "--clients", why)


def test_an_ipv6_loopback_bind_serves(avatar_dir):
    with ServerProcess(avatar_dir, bind="tcp://[::1]:*") as srv:
        assert srv.endpoint.startswith("tcp://[::1]:")
        Client(srv.endpoint, timeout_s=30).ping()  # answered, or ServerUnavailable


def test_a_reader_of_large_frames_is_never_mistaken_for_a_stalled_client(server):
    client = Client(server.endpoint, timeout_s=60)
    frames = list(client.render_sequence([_controls(i) for i in range(40)], size=1024, credit=4))
    assert [f.seq for f in frames] == list(range(40)) and all(len(f.data) == 1024 * 1024 * 3 for f in frames)
    frames = list(client.render_sequence([_controls(i) for i in range(24)], fmt="rgba8", size=2048))
    assert len(frames) == 24


def test_a_sequence_without_a_credit_field_streams_whole(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send(protocol.request("render_sequence", 9, frames=[_controls(i) for i in range(30)], size=32))
    kinds = []
    while "done" not in kinds:
        assert sock.poll(30000), kinds
        kinds.append(protocol.unpack(sock.recv_multipart()[0])["type"])
    assert kinds.count("frame") == 30
    sock.close(linger=0)


def test_a_sequence_id_in_use_is_refused(server):
    client = Client(server.endpoint, timeout_s=30)
    first = client.start_sequence([_controls(i) for i in range(50)], size=32, credit=1)
    client.sock.send(protocol.request("render_sequence", first, frames=[_controls(0)], size=32, credit=1))
    end, errors = time.monotonic() + 10, []
    while not errors and time.monotonic() < end:
        errors = [h for h, _ in client.poll(0.2) if h["type"] == "error"]
    assert errors and errors[0]["id"] == first and errors[0]["field"] == "id"
    client.cancel(first)


def test_frames_say_which_controls_were_clamped(server):
    client = Client(server.endpoint, timeout_s=30)
    inside = [0.0] * CHANNELS
    beyond = [500.0, 0.0, 0.0, 0.0, 0.0, 0.0, -9.0, 0.0, 0.0]  # yaw and exp_01 past the avatar's range
    assert client.render(inside, use_cache=False).clamped == ()
    assert client.render(beyond, use_cache=False).clamped == ("head_yaw", "exp_01")
    frames = list(client.render_sequence([inside, beyond], size=32))
    assert [f.clamped for f in frames] == [(), ("head_yaw", "exp_01")]
