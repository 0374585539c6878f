import threading

import cv2
import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvp.avatar import Avatar
from pvp.serve.process import ServerProcess
from pvp_contract import protocol
from pvp_contract.client import Client, CurveKeys, ServerError, ServerUnavailable


@pytest.fixture(scope="module")
def avatar(avatar_dir):
    return Avatar.load(avatar_dir)


@pytest.fixture(scope="module")
def server(avatar_dir):
    s = ServerProcess(avatar_dir)
    yield s
    assert s.stop() == 0  # SIGTERM: a clean stop


def _controls(seed, n=9):
    rng = np.random.default_rng(seed)
    return [float(v) for v in rng.uniform(-15, 15, n)]


def _direct(avatar, controls):
    return avatar.render_uint8(torch.tensor([controls]))[0]


def test_round_trip_is_pixel_exact(server, avatar):
    c = Client(server.endpoint, timeout_s=20)
    info = c.hello()
    assert info["avatar"]["resolution"] == 32 and len(info["avatar"]["control_schema"]["channels"]) == 9
    for seed in range(3):
        ctrl = _controls(seed)
        f = c.render(ctrl, use_cache=False)
        assert (f.width, f.height, f.format) == (32, 32, "rgb8")
        got = np.frombuffer(f.data, np.uint8).reshape(32, 32, 3)
        assert np.array_equal(got, _direct(avatar, ctrl))
    rgba = c.render(_controls(0), fmt="rgba8", size=64, use_cache=False)
    assert (rgba.width, rgba.height, len(rgba.data)) == (64, 64, 64 * 64 * 4)
    png = c.render(_controls(0), fmt="png", use_cache=False)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decoded, _direct(avatar, _controls(0)))
    assert c.render(_controls(0), fmt="jpeg", quality=80, use_cache=False).data[:2] == b"\xff\xd8"
    with pytest.raises(ServerError, match="controls has 3 values"):
        c.render([0.0, 1.0, 2.0], use_cache=False)
    c.close()


def test_cache_answers_repeated_controls_locally(server):
    c = Client(server.endpoint, timeout_s=20)
    a = c.render(_controls(5))
    b = c.render([v + 1e-5 for v in _controls(5)])  # same key after quantisation
    assert a is b
    c.close()


def test_concurrent_clients_get_their_own_frames(server, avatar):
    errors, results = [], {}

    def worker(k):
        try:
            c = Client(server.endpoint, timeout_s=60)
            for j in range(50):
                ctrl = _controls(1000 * k + j)
                f = c.render(ctrl, use_cache=False)
                results[(k, j)] = (ctrl, np.frombuffer(f.data, np.uint8).reshape(32, 32, 3))
            c.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 400
    for (k, j), (ctrl, img) in list(results.items())[::7]:
        assert np.abs(img.astype(int) - _direct(avatar, ctrl).astype(int)).max() <= 1


def test_sequence_streams_and_a_vanishing_client_disturbs_no_one(server, avatar):
    frames = [_controls(i) for i in range(40)]
    quitter = Client(server.endpoint, timeout_s=20)
    stream = quitter.render_sequence([_controls(i) for i in range(300)])
    next(stream)
    quitter.sock.close(linger=0)  # gone mid-sequence, without cancelling
    c = Client(server.endpoint, timeout_s=60)
    got = {f.seq: f for f in c.render_sequence(frames, first_seq=100)}
    assert sorted(got) == list(range(100, 140))
    img = np.frombuffer(got[107].data, np.uint8).reshape(32, 32, 3)
    assert np.abs(img.astype(int) - _direct(avatar, frames[7]).astype(int)).max() <= 1
    assert c.ping() < 5
    c.close()
    assert server.alive()


def test_cancel_stops_a_sequence(server):
    c = Client(server.endpoint, timeout_s=20)
    request_id = c.start_sequence([_controls(i) for i in range(2000)])
    c._wait(request_id)  # the first frame
    c.cancel(request_id)
    replies = []
    while True:
        got = c.poll(2.0)
        if not got:
            break
        replies += got
    kinds = [h["type"] for h, _ in replies]
    assert kinds.count("cancelled") == 1 and "done" not in kinds  # stopped, never finished
    assert next(h for h, _ in replies if h["type"] == "cancelled")["found"]
    assert "frame" not in kinds[kinds.index("cancelled"):]  # no frame of the sequence after the cancel
    c.close()


def _raw_exchange(endpoint, frames, timeout_ms=3000):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart(frames)
    reply = s.recv_multipart() if s.poll(timeout_ms) else None
    s.close(linger=0)
    return reply


ANSWERS = {"hello": "info", "ping": "pong", "face_mesh": "face_mesh", "render": "frame", "render_sequence": "frame",
           "cancel": "cancelled"}
msgpack_ints = st.integers(-2**63, 2**64 - 1)
junk_values = st.recursive(st.none() | st.booleans() | msgpack_ints | st.floats() | st.text(max_size=20)
                           | st.binary(max_size=20), lambda c: st.lists(c, max_size=5)
                           | st.dictionaries(st.text(max_size=8), c, max_size=5), max_leaves=20)
messages = st.one_of(
    st.binary(max_size=200),
    junk_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.fixed_dictionaries({"v": st.sampled_from([1, 2, "1", None]), "type": st.sampled_from(
        ["render", "render_sequence", "hello", "cancel", "nope", 3]), "id": st.one_of(st.integers(-5, 2**64 - 1),
                                                                                      st.text(max_size=3))},
        optional={"controls": junk_values, "frames": junk_values, "edits": junk_values, "size": junk_values,
                  "format": junk_values, "target": junk_values, "quality": junk_values}).map(
        lambda d: msgpack.packb(d, use_bin_type=True)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(messages)
def test_fuzzed_messages_are_answered_as_the_protocol_says(server, data):
    reply = _raw_exchange(server.endpoint, [data], timeout_ms=5000)
    assert reply is not None  # every request gets a reply
    header = protocol.unpack(reply[0])
    try:
        request = protocol.validate_request(protocol.unpack(data))
    except protocol.ProtocolError as e:  # malformed: the error the protocol module names
        assert header["type"] == "error" and header["code"] == e.code and header["message"]
    else:  # well-formed: its own reply, or an avatar-level refusal of its values
        assert header["id"] == request["id"]
        assert header["type"] == ANSWERS[request["type"]] or (header["type"], header["code"]) == ("error",
                                                                                              protocol.INVALID_FIELD)
    ok = _raw_exchange(server.endpoint, [protocol.request("ping", 7)])
    assert ok is not None and protocol.unpack(ok[0])["type"] == "pong"


def test_wrong_types_get_structured_errors(server):
    bad = [({"v": 1, "type": "render", "id": 1, "controls": ["x"] * 9}, "controls[0]"),
           ({"v": 1, "type": "render", "id": 2, "controls": [float("nan")] * 9}, "controls[0]"),
           ({"v": 1, "type": "render", "id": 3, "controls": [0.0] * 9, "size": 5}, "size"),
           ({"v": 1, "type": "render", "id": 4, "controls": [0.0] * 9, "format": "gif"}, "format"),
           ({"v": 9, "type": "ping", "id": 5}, "v")]
    for msg, field in bad:
        header = protocol.unpack(_raw_exchange(server.endpoint, [msgpack.packb(msg)])[0])
        assert header["type"] == "error" and header["field"] == field and header["id"] == msg["id"]
    two = _raw_exchange(server.endpoint, [protocol.request("ping", 1), b"extra"])
    assert protocol.unpack(two[0])["code"] == protocol.BAD_MESSAGE


def test_oversized_message_is_refused_and_the_server_stays_up(server):
    assert _raw_exchange(server.endpoint, [b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1)], timeout_ms=1500) is None
    ok = _raw_exchange(server.endpoint, [protocol.request("ping", 1)])
    assert protocol.unpack(ok[0])["type"] == "pong"


def test_curve_only_accepted_keys_get_in(avatar_dir, tmp_path):
    from pvp.cli import main

    clients = tmp_path / "clients"
    assert main(["keys", str(tmp_path / "server"), "server"]) == 0
    assert main(["keys", str(tmp_path / "alice"), "alice"]) == 0
    assert main(["keys", str(tmp_path / "mallory"), "mallory"]) == 0
    clients.mkdir()
    (clients / "alice.key").write_bytes((tmp_path / "alice" / "alice.key").read_bytes())
    s = ServerProcess(avatar_dir, "--curve-secret", tmp_path / "server" / "server.key_secret", "--clients", clients)
    try:
        server_key = tmp_path / "server" / "server.key"
        good = Client(s.endpoint, timeout_s=10, curve=CurveKeys(server_key, tmp_path / "alice" / "alice.key_secret"))
        assert good.ping() < 10
        bad = Client(s.endpoint, timeout_s=2, curve=CurveKeys(server_key, tmp_path / "mallory" / "mallory.key_secret"))
        with pytest.raises(ServerUnavailable):
            bad.ping()
        plain = Client(s.endpoint, timeout_s=2)
        with pytest.raises(ServerUnavailable):
            plain.ping()
        for c in (good, bad, plain):
            c.close()
    finally:
        s.stop()


def test_non_loopback_bind_needs_curve(avatar_dir):
    from pvp.cli import main

    assert main(["serve", str(avatar_dir), "--bind", "tcp://0.0.0.0:5599", "--device", "cpu"]) == 2
