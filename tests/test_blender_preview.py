"""The add-on's pure modules (preview, rig specs, timeline job) outside Blender, against a real server."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from pvp.serve.process import ServerProcess, free_endpoint
from pvp_contract.geometry import rot_x, rot_y, rot_z
from tests.helpers import assert_same_render, blender_bone_frame

ROOT = Path(__file__).resolve().parents[1]


def _controls(i: float) -> list[float]:
    return [float(i), -float(i) / 2, 0.0, 5.0, 0.0, 0.1 * i, 0.0, 0.0, 0.0]


def _pump_until(preview, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = preview.pump(0.05)
        if frame is not None:
            return frame
    raise AssertionError(f"no frame within {timeout} s: {preview.message}")


def test_preview_shows_only_the_latest_wanted_frame(server):
    from blender_addon.preview import CONNECTED, Preview
    from pvp_contract.client import Client

    preview = Preview(Client(server.endpoint, 20.0))
    reference = Client(server.endpoint, 20.0)
    assert preview.want(_controls(1)) is None
    assert preview.want(_controls(2)) is None  # supersedes the first before it arrives
    frame = _pump_until(preview)
    assert frame.data == reference.render(_controls(2), use_cache=False).data
    deadline = time.monotonic() + 20
    while preview.in_flight and time.monotonic() < deadline:
        assert preview.pump(0.05) is None  # the first reply may come later: cached, never shown
    assert preview.dropped_stale <= 1 and preview.state == CONNECTED
    cached = preview.want(_controls(1))  # the stale reply filled the cache: shown at once
    assert cached is not None and cached.data == reference.render(_controls(1), use_cache=False).data


def test_prefetch_fills_the_cache_ahead(server):
    from blender_addon.preview import Preview
    from pvp_contract.client import Client

    preview = Preview(Client(server.endpoint, 20.0), max_in_flight=4)
    ahead = [(_controls(i), {}) for i in range(10, 16)]
    assert preview.prefetch(ahead) == 4  # bounded by max_in_flight
    deadline = time.monotonic() + 20
    while preview.in_flight and time.monotonic() < deadline:
        preview.pump(0.05)
    assert preview.prefetch(ahead) == 2  # the first four are cached now
    assert all(preview.want(c) is not None for c, _ in ahead[:4])


def test_server_down_is_reported_and_recovered(avatar_dir):
    from blender_addon.preview import CONNECTED, DOWN, Preview
    from pvp_contract.client import Client

    endpoint = free_endpoint()
    preview = Preview(Client(endpoint, 0.5), probe_interval_s=0.2)
    assert preview.want(_controls(3)) is None
    deadline = time.monotonic() + 5
    while preview.state != DOWN and time.monotonic() < deadline:
        preview.pump(0.05)
    assert preview.state == DOWN and "no reply from" in preview.message
    srv = ServerProcess(avatar_dir, bind=endpoint)
    try:
        frame = _pump_until(preview)
        assert preview.state == CONNECTED and preview.message.startswith("connected")
        assert frame.data == Client(endpoint, 20.0).render(_controls(3), use_cache=False).data
    finally:
        srv.stop()


def test_pixels_are_bottom_up_rgba():
    from blender_addon.preview import pixels_rgba
    from pvp_contract.client import Frame

    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    px = pixels_rgba(Frame(1, 3, 2, "rgb8", rgb.tobytes())).reshape(2, 3, 4)
    np.testing.assert_array_equal(np.round(px[..., :3] * 255).astype(np.uint8), rgb[::-1])
    assert (px[..., 3] == 1).all()


def test_timeline_job_writes_exact_frames_and_resumes(server, tmp_path):
    from blender_addon.timeline import TimelineJob, frame_path
    from pvp.images import load_rgb
    from pvp_contract.client import Client

    frames = [(f, _controls(f)) for f in range(3, 9)]
    job = TimelineJob(Client(server.endpoint, 20.0), frames, {}, tmp_path, chunk=4)
    assert job.run() == 6 and job.written == 6
    assert sorted(p.name for p in tmp_path.glob("frame_*")) == [frame_path(tmp_path, f).name for f in range(3, 9)]
    reference = Client(server.endpoint, 20.0)
    for f, c in frames:
        rgb = np.frombuffer(reference.render(c, use_cache=False).data, np.uint8).reshape(32, 32, 3)
        assert_same_render(load_rgb(frame_path(tmp_path, f)), rgb)
    stamp = frame_path(tmp_path, 3).stat().st_mtime_ns
    frame_path(tmp_path, 5).unlink()
    again = TimelineJob(Client(server.endpoint, 20.0), frames, {}, tmp_path)
    assert again.skipped == 5 and again.run() == 6 and again.written == 1
    assert frame_path(tmp_path, 3).stat().st_mtime_ns == stamp
    # keys changed on two frames: a resumed render re-renders exactly those, and the new pixels are there
    changed = [(f, _controls(f + 100) if f in (4, 7) else c) for f, c in frames]
    third = TimelineJob(Client(server.endpoint, 20.0), changed, {}, tmp_path)
    assert third.skipped == 4 and third.run() == 6 and third.written == 2
    rgb = np.frombuffer(reference.render(_controls(107), use_cache=False).data, np.uint8).reshape(32, 32, 3)
    assert_same_render(load_rgb(frame_path(tmp_path, 7)), rgb)
    assert frame_path(tmp_path, 3).stat().st_mtime_ns == stamp
    other_size = TimelineJob(Client(server.endpoint, 20.0), changed, {}, tmp_path, size=48)
    assert other_size.skipped == 0  # a different output size shows different pixels


def test_rig_files_parse_and_bad_ones_name_the_problem(tmp_path):
    from blender_addon.rig import RigError, load_rig, parse_rig
    from pvp_contract import controls

    spec = load_rig(ROOT / "rigs" / "flame_pvp.json")
    schema = controls.schema(4, (-40, 40), (-30, 30), (0, 30))
    assert spec.matches(schema)
    # the rig's bone frame is FLAME's: yaw about +Y, pitch about -X, roll about -Z, summed over neck and head
    rotations = {"head": (np.radians(-4), np.radians(10), np.radians(2)), "neck": (0.0, np.radians(5), 0.0),
                 "jaw": (np.radians(12), 0.0, 0.0)}
    values = spec.controls(schema, lambda b: rotations.get(b, (0, 0, 0)), lambda k: {"exp_01": 1.5}.get(k))
    np.testing.assert_allclose(values, [15.0, 4.0, -2.0, 12.0, 0.0, 0.0, 1.5, 0.0, 0.0], atol=1e-9)
    assert spec.bone_target("head_pitch", 6.0)[:2] == ("head", 0)
    assert np.isclose(spec.bone_target("head_pitch", 6.0)[2], np.radians(-6.0))
    data = json.loads((ROOT / "rigs" / "flame_pvp.json").read_text())
    data["channels"]["jaw_open"][0]["bone"] = "chin"
    with pytest.raises(RigError, match=r"my.json: channels.jaw_open\[0\].bone 'chin' is not a bone"):
        parse_rig(data, "my.json")
    data = json.loads((ROOT / "rigs" / "flame_pvp.json").read_text())
    del data["channels"]["head_roll"]
    with pytest.raises(RigError, match=r"required channels \['head_roll'\]"):
        parse_rig(data, "my.json")


def test_face_mesh_request_without_a_face_model_is_a_clear_error(server):
    from pvp_contract.client import Client, ServerError

    with pytest.raises(ServerError, match="invalid_field: this avatar has no face model"):
        Client(server.endpoint, 20.0).face_mesh()


def test_control_mesh_jaw_moves_sideways_as_the_avatar_does():
    """jaw_lateral is FLAME's jaw rotation about +Y (up): positive moves the chin to the subject's left (+X).
    The control mesh follows the jaw bone; its chin must move the same way (it was mirrored)."""
    from blender_addon.rig import load_rig

    spec = load_rig(ROOT / "rigs" / "flame_pvp.json")
    bone, axis, angle = spec.bone_target("jaw_lateral", 10.0)
    jaw = next(b for b in spec.bones if b["name"] == bone)
    frame = blender_bone_frame(jaw["head"], jaw["tail"])
    pose = frame @ (rot_x, rot_y, rot_z)[axis](angle) @ frame.T  # the bone's pose rotation in armature space
    to_flame = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # Blender (X, Y, Z) -> FLAME (X, Z, -Y)
    chin = np.subtract(jaw["tail"], jaw["head"])
    mesh_shift = to_flame @ (pose @ chin - chin)
    avatar_shift = rot_y(np.radians(10.0)) @ (to_flame @ chin) - to_flame @ chin
    assert avatar_shift[0] > 0 and mesh_shift[0] * avatar_shift[0] > 0, (mesh_shift, avatar_shift)
    assert mesh_shift[0] == pytest.approx(avatar_shift[0], rel=0.2)
    # and the rig reads the pose back as the value it was given
    controls = spec.controls({"channels": [{"name": "jaw_lateral", "group": "jaw", "default": 0.0}]},
                             lambda b: [angle if i == axis and b == bone else 0.0 for i in range(3)], lambda _: None)
    assert controls == pytest.approx([10.0])
