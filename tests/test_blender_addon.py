"""The extension inside the real Blender (bpy 4.5 from PyPI) against real `pvp serve` subprocesses.

Blender runs in this process with its user resources in a temporary folder (the user's own Blender
config is never read); the extension is installed from the zip build_addon.py writes, through Blender's
own extension operators. Timers do not fire in a Python-module Blender, so tests call the add-on's timer
function (``tick``) or its blocking ``pvp.sync`` operator, which runs the same code.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pvp.avatar import random_avatar
from pvp.images import load_rgb
from pvp.serve.process import ServerProcess, free_endpoint
from tests.helpers import assert_same_render, blender_bone_frame, install_extension, plane_pixels, server_frame

ROOT = Path(__file__).resolve().parents[1]
RIG = json.loads((ROOT / "rigs" / "flame_pvp.json").read_text())
PKG = "bl_ext.user_default.pvp_blender"


@pytest.fixture(scope="module")
def bpy(addon_zip):
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="pvp_blender_user_")
    import bpy as blender

    install_extension(blender, addon_zip)
    return blender


@pytest.fixture(scope="module")
def avatars(tmp_path_factory, d12_track):
    d = tmp_path_factory.mktemp("avatars")
    random_avatar(resolution=32, expression_dim=4).save(d / "proxy")
    from pvp.cli import main

    d12_track.save(d / "d12.safetensors")
    assert main(["avatar", "random", "-o", str(d / "face"), "--resolution", "32", "--expression-dim", "4",
                 "--face-model-from", str(d / "d12.safetensors")]) == 0
    assert main(["edits", "discover", str(d / "face"), "--count", "2"]) == 0
    return d


@pytest.fixture
def addon(bpy):
    bpy.ops.wm.read_homefile(use_empty=True)
    ops = sys.modules[f"{PKG}.bl_ops"]
    yield ops
    ops.runtime.close()


def connect(bpy, ops, endpoint, timeout_s=20.0):
    prefs = ops.prefs()
    prefs.endpoint, prefs.timeout_s = endpoint, timeout_s
    assert bpy.ops.pvp.connect() == {"FINISHED"}
    return ops.runtime.session


@pytest.fixture(scope="module")
def face_server(avatars):
    srv = ServerProcess(avatars / "face")
    yield srv
    srv.stop()


def test_add_rig_builds_the_rig_file_and_frames_match_the_server(bpy, addon, face_server):
    session = connect(bpy, addon, face_server.endpoint)
    assert session.info["avatar"]["has_face_model"]
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    scene = bpy.context.scene
    rig, mesh = scene.pvp.rig, scene.pvp.mesh
    assert [b.name for b in rig.data.bones] == [b["name"] for b in RIG["bones"]]
    for spec in RIG["bones"]:
        bone = rig.data.bones[spec["name"]]
        np.testing.assert_allclose(bone.head_local, spec["head"], atol=1e-6)
        np.testing.assert_allclose(bone.tail_local, spec["tail"], atol=1e-6)
        assert (bone.parent.name if bone.parent else None) == spec["parent"]
        assert rig.pose.bones[spec["name"]].rotation_mode == spec["rotation_mode"]
        rest = blender_bone_frame(spec["head"], spec["tail"])  # what the pure jaw-direction test assumes
        np.testing.assert_allclose(bone.matrix_local.to_3x3(), rest, atol=1e-6)
    schema = session.info["avatar"]["control_schema"]
    exp = [c for c in schema["channels"] if c["group"] == "expression"]
    keys = mesh.data.shape_keys.key_blocks
    assert [k.name for k in keys] == ["Basis"] + [c["name"] for c in exp]
    assert len(mesh.data.vertices) == 468 and len(mesh.data.polygons) > 800  # the avatar's own face mesh
    basis = np.array([v.co for v in keys["Basis"].data])
    assert np.linalg.norm(np.array([v.co for v in keys["exp_00"].data]) - basis, axis=1).max() > 1e-4
    edits = [e["name"] for e in session.info["avatar"]["edits"]]
    assert len(edits) == 2 and all(f"pvp_edit_{e}" in rig for e in edits)

    head, jaw = rig.pose.bones["head"], rig.pose.bones["jaw"]
    for frame, (yaw, pitch, jaw_open, e1, edit) in {1: (0, 0, 0, 0, 0), 5: (20, -8, 15, 1.5, 1.0),
                                                    10: (-10, 5, 5, -1, -0.5)}.items():
        head.rotation_euler = (np.radians(-pitch), np.radians(yaw), 0.0)
        jaw.rotation_euler = (np.radians(jaw_open), 0.0, 0.0)
        keys["exp_01"].value = e1
        rig[f"pvp_edit_{edits[0]}"] = edit
        head.keyframe_insert("rotation_euler", frame=frame)
        jaw.keyframe_insert("rotation_euler", frame=frame)
        keys["exp_01"].keyframe_insert("value", frame=frame)
        rig.keyframe_insert(f'["pvp_edit_{edits[0]}"]', frame=frame)
    scene.frame_set(5)
    assert bpy.ops.pvp.sync() == {"FINISHED"}
    want = server_frame(face_server.endpoint, [20, -8, 0, 15, 0, 0, 1.5, 0, 0], {edits[0]: 1.0})
    np.testing.assert_array_equal(plane_pixels(scene.pvp.image), want)
    scene.frame_set(10)
    assert bpy.ops.pvp.sync() == {"FINISHED"}
    want = server_frame(face_server.endpoint, [-10, 5, 0, 5, 0, 0, -1, 0, 0], {edits[0]: -0.5})
    np.testing.assert_array_equal(plane_pixels(scene.pvp.image), want)
    # prefetching reads the same values from the F-curves
    reader = addon.rig_reader(scene)
    (controls, edit_values), = reader.at([5])
    np.testing.assert_allclose(controls, [20, -8, 0, 15, 0, 0, 1.5, 0, 0], atol=1e-4)
    assert edit_values[edits[0]] == pytest.approx(1.0)


def _take_curves(idblock, take):
    """The F-curves of an imported take: its own action, on the NLA track named after it."""
    tracks = [tr for tr in idblock.animation_data.nla_tracks if tr.name == take]
    assert len(tracks) == 1, [tr.name for tr in idblock.animation_data.nla_tracks]
    (strip,) = tracks[0].strips
    return {(fc.data_path, fc.array_index): fc for fc in strip.action.fcurves}, strip


def _keys(fc):
    return np.array([k.co[:] for k in fc.keyframe_points])


def test_import_track_keys_a_take_of_its_own(bpy, addon, face_server, tmp_path):
    connect(bpy, addon, face_server.endpoint)
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    scene = bpy.context.scene
    rig, shape_keys = scene.pvp.rig, scene.pvp.mesh.data.shape_keys
    n = 9
    rows = ["frame,head_yaw,head_pitch,jaw_open,exp_00,exp_02"]
    rows += [f"{i},{2.0 * i - 5},{-i * 0.5},{i % 4 * 3.0},{0.2 * i - 0.7},{(-1) ** i * 0.3}" for i in range(n)]
    (tmp_path / "drive.csv").write_text("\n".join(rows) + "\n")
    table = np.loadtxt(tmp_path / "drive.csv", delimiter=",", skiprows=1)
    assert bpy.ops.pvp.import_track(filepath=str(tmp_path / "drive.csv"), start_frame=11, renormalize="NONE",
                                    resample=False) == {"FINISHED"}
    curves, strip = _take_curves(rig, "PVP drive")
    key_curves, _ = _take_curves(shape_keys, "PVP drive")
    assert strip.frame_start == 11 and strip.extrapolation == "NOTHING"
    yaw = _keys(curves[('pose.bones["head"].rotation_euler', 1)])
    pitch = _keys(curves[('pose.bones["head"].rotation_euler', 0)])
    jaw = _keys(curves[('pose.bones["jaw"].rotation_euler', 0)])
    e0, e2 = _keys(key_curves[('key_blocks["exp_00"].value', 0)]), _keys(key_curves[('key_blocks["exp_02"].value', 0)])
    for got in (yaw, pitch, jaw, e0, e2):
        assert len(got) == n
        np.testing.assert_array_equal(got[:, 0], 11 + np.arange(n))
    np.testing.assert_allclose(np.degrees(yaw[:, 1]), table[:, 1], atol=1e-4)
    np.testing.assert_allclose(-np.degrees(pitch[:, 1]), table[:, 2], atol=1e-4)  # pitch up = -X rotation
    np.testing.assert_allclose(np.degrees(jaw[:, 1]), table[:, 3], atol=1e-4)
    np.testing.assert_allclose(e0[:, 1], table[:, 4], atol=1e-6)
    np.testing.assert_allclose(e2[:, 1], table[:, 5], atol=1e-6)
    # the live frame inside the take is the server's render of the take's values (the NLA is evaluated), and
    # prefetching reads the same values from the strip
    scene.frame_set(15)
    assert bpy.ops.pvp.sync() == {"FINISHED"}
    want = [table[4, 1], table[4, 2], 0, table[4, 3], 0, table[4, 4], 0, table[4, 5], 0]
    np.testing.assert_array_equal(plane_pixels(scene.pvp.image), server_frame(face_server.endpoint, want))
    (controls, _), = addon.rig_reader(scene).at([15])
    np.testing.assert_allclose(controls, want, atol=1e-4)
    # renormalised, imported again: the take is replaced, not stacked
    stats = addon.runtime.session.info["avatar"]["expression_stats"]
    assert bpy.ops.pvp.import_track(filepath=str(tmp_path / "drive.csv"), start_frame=1, renormalize="RENORMALIZE",
                                    resample=False, use_head=False) == {"FINISHED"}
    key_curves, strip = _take_curves(shape_keys, "PVP drive")
    e0 = _keys(key_curves[('key_blocks["exp_00"].value', 0)])
    raw = table[:, 4]
    expected = (raw - raw.mean()) / raw.std() * stats["std"][2] + stats["mean"][2]
    assert len(e0) == n and strip.frame_start == 1
    np.testing.assert_allclose(e0[:, 1], expected, atol=1e-5)
    # a broken file is one clear error naming it, and changes nothing
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="broken.npz"):
        bpy.ops.pvp.import_track(filepath=str(tmp_path / "broken.npz"))
    (tmp_path / "faceless.csv").write_text("frame,head_yaw\n1,\n2,\n")
    with pytest.raises(RuntimeError, match="faceless.csv: no frame with a face"):
        bpy.ops.pvp.import_track(filepath=str(tmp_path / "faceless.csv"))


def test_import_keeps_timing_and_every_other_key(bpy, addon, face_server, tmp_path):
    connect(bpy, addon, face_server.endpoint)
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    scene = bpy.context.scene
    rig = scene.pvp.rig
    head = rig.pose.bones["head"]
    head.rotation_euler = (0.0, np.radians(12.0), 0.0)  # an animator's own key, far from the take
    head.keyframe_insert("rotation_euler", frame=500)
    rows = ["frame,head_yaw,jaw_open"] + [f"{f},{f * 0.5},{f % 7}" for f in range(1, 60, 2)]
    (tmp_path / "stride2.csv").write_text("\n".join(rows) + "\n")
    assert bpy.ops.pvp.import_track(filepath=str(tmp_path / "stride2.csv"), start_frame=1, renormalize="NONE",
                                    set_frame_range=True) == {"FINISHED"}
    curves, _ = _take_curves(rig, "PVP stride2")
    yaw = _keys(curves[('pose.bones["head"].rotation_euler', 1)])
    np.testing.assert_array_equal(yaw[:, 0], np.arange(1, 60, 2))  # keyed on exactly the source frames
    np.testing.assert_allclose(np.degrees(yaw[:, 1]), np.arange(1, 60, 2) * 0.5, atol=1e-4)
    assert (scene.frame_start, scene.frame_end) == (1, 59)
    mine = {(fc.data_path, fc.array_index): fc for tr in rig.animation_data.nla_tracks for s in tr.strips
            for fc in s.action.fcurves if s.action.name != "PVP stride2"}
    own_yaw = _keys(mine[('pose.bones["head"].rotation_euler', 1)])
    np.testing.assert_allclose(own_yaw, [[500, np.radians(12.0)]], atol=1e-6)  # untouched, pushed into the NLA
    scene.frame_set(500)  # outside the take, the animator's key plays
    assert np.degrees(rig.pose.bones["head"].rotation_euler[1]) == pytest.approx(12.0, abs=1e-4)
    scene.frame_set(21)
    assert np.degrees(rig.pose.bones["head"].rotation_euler[1]) == pytest.approx(10.5, abs=1e-4)
    # merged into an active action: keys outside the take's range stay
    jaw = rig.pose.bones["jaw"]
    jaw.rotation_euler = (np.radians(3.0), 0.0, 0.0)
    jaw.keyframe_insert("rotation_euler", frame=300)
    assert bpy.ops.pvp.import_track(filepath=str(tmp_path / "stride2.csv"), start_frame=1, renormalize="NONE",
                                    mode="MERGE", use_head=False) == {"FINISHED"}
    jaw_keys = _keys(next(fc for fc in rig.animation_data.action.fcurves
                          if fc.data_path == 'pose.bones["jaw"].rotation_euler' and fc.array_index == 0))
    np.testing.assert_array_equal(jaw_keys[:, 0], [*range(1, 60, 2), 300])
    assert np.degrees(jaw_keys[-1, 1]) == pytest.approx(3.0, abs=1e-4)
    jaw_curve = next(fc for fc in rig.animation_data.action.fcurves
                     if fc.data_path == 'pose.bones["jaw"].rotation_euler' and fc.array_index == 0)
    assert {k.interpolation for k in jaw_curve.keyframe_points if k.co[0] < 100} == {"LINEAR"}
    # decimated: the straight yaw ramp needs its two ends only; the take is replaced, not stacked
    assert bpy.ops.pvp.import_track(filepath=str(tmp_path / "stride2.csv"), start_frame=1, renormalize="NONE",
                                    decimate=True) == {"FINISHED"}
    curves, _ = _take_curves(rig, "PVP stride2")
    np.testing.assert_array_equal(_keys(curves[('pose.bones["head"].rotation_euler', 1)])[:, 0], [1, 59])


def test_timeline_fast_and_scene_paths(bpy, addon, face_server, tmp_path):
    connect(bpy, addon, face_server.endpoint)
    scene = bpy.context.scene
    cam_data = bpy.data.cameras.new("cam")
    cam = bpy.data.objects.new("cam", cam_data)
    scene.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0.0, -3.0, 0.25), (np.pi / 2, 0.0, 0.0)
    scene.camera = cam
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}  # the plane fills 80% of the camera's view height
    head = scene.pvp.rig.pose.bones["head"]
    for frame, yaw in ((1, -25.0), (4, 25.0)):
        head.rotation_euler = (0.0, np.radians(yaw), 0.0)
        head.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_start, scene.frame_end = 1, 4
    scene.pvp.output_dir = str(tmp_path / "fast") + "/"
    scene.pvp.movie_path = str(tmp_path / "timeline.mp4")
    assert bpy.ops.pvp.render_timeline() == {"FINISHED"}
    import cv2

    movie = cv2.VideoCapture(str(tmp_path / "timeline.mp4"))
    assert int(movie.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert int(movie.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") == b"h264"
    movie.release()
    scene.pvp.movie_path = ""
    files = sorted((tmp_path / "fast").glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{i:06d}.png" for i in range(1, 5)]
    reader = addon.rig_reader(scene)
    expected = []
    for f in range(1, 5):
        scene.frame_set(f)
        controls, edits = reader.now()
        expected.append(server_frame(face_server.endpoint, controls, edits))
        assert_same_render(load_rgb(files[f - 1]), expected[-1])
    assert not np.array_equal(expected[0], expected[-1])

    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = 4, "CPU"
    scene.view_settings.view_transform = "Standard"
    scene.pvp.output_dir = str(tmp_path / "scene") + "/"
    scene.frame_end = 2
    assert bpy.ops.pvp.render_scene() == {"FINISHED"}

    for f in (1, 2):
        render = load_rgb(tmp_path / "scene" / f"frame_{f:06d}.png").astype(np.float32)
        plane = cv2.resize(render[8:56, 8:56], (32, 32), interpolation=cv2.INTER_AREA)  # the plane: central 80%
        errors = [np.abs(plane - cv2.resize(e.astype(np.float32)[1:-1, 1:-1], (32, 32))).mean() for e in expected[:2]]
        print("scene path: mean abs error vs the avatar frames", errors)
        assert errors[f - 1] < 12.0 and errors[f - 1] < errors[2 - f], errors


def _camera_scene(bpy, size=64):
    scene = bpy.context.scene
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    scene.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0.0, -3.0, 0.25), (np.pi / 2, 0.0, 0.0)
    scene.camera = cam
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    return scene


def test_rig_range_and_render_settings_follow_the_avatar(bpy, addon, face_server):
    connect(bpy, addon, face_server.endpoint)
    scene = _camera_scene(bpy)
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    schema = {c["name"]: c for c in addon.runtime.session.info["avatar"]["control_schema"]["channels"]}
    jaw = scene.pvp.rig.pose.bones["jaw"].constraints[0]
    assert np.degrees([jaw.min_x, jaw.max_x]) == pytest.approx([schema["jaw_open"]["min"], schema["jaw_open"]["max"]])
    head = scene.pvp.rig.pose.bones["head"].constraints[0]
    assert np.degrees([head.min_y, head.max_y]) == pytest.approx([schema["head_yaw"]["min"], schema["head_yaw"]["max"]])
    assert scene.pvp.mesh.hide_render and not scene.pvp.plane.hide_render  # the control mesh never renders
    assert scene.view_settings.view_transform == "Standard" and scene.view_settings.look == "None"
    with pytest.raises(RuntimeError, match="has a PVP rig already"):
        bpy.ops.pvp.add_rig()
    assert sum(1 for ob in scene.objects if ob.type == "ARMATURE") == 1
    # the avatar's range reached: the neck adds to a head turned to its limit, the server clamps and says so
    scene.pvp.rig.pose.bones["head"].rotation_euler = (0.0, np.radians(schema["head_yaw"]["max"]), 0.0)
    scene.pvp.rig.pose.bones["neck"].rotation_euler = (0.0, np.radians(10.0), 0.0)
    assert bpy.ops.pvp.sync() == {"FINISHED"}
    assert addon.runtime.session.preview.clamped == ("head_yaw",)
    keys = scene.pvp.mesh.data.shape_keys.key_blocks
    keys["exp_01"].value = 1.0
    assert bpy.ops.pvp.reset(what="POSE") == {"FINISHED"}
    assert all(tuple(pb.rotation_euler) == (0.0, 0.0, 0.0) for pb in scene.pvp.rig.pose.bones)
    assert keys["exp_01"].value == 1.0  # the expression stays until reset on its own
    assert bpy.ops.pvp.reset(what="EXPRESSION") == {"FINISHED"}
    assert keys["exp_01"].value == 0.0
    assert bpy.ops.pvp.sync() == {"FINISHED"} and addon.runtime.session.preview.clamped == ()


def test_background_render_animation_shows_each_frame(bpy, addon, face_server, tmp_path):
    """`blender -b scene.blend -a`: the file is opened (the extension connects), Blender's own Render
    Animation renders three keyed frames, and each shows the server's frame for that frame. The frames come
    from the render_pre handler alone (the frame-change handler leaves a render's frames to it), the same
    code that runs for Render / Render Animation from the UI (see the render-job test below)."""
    import cv2

    connect(bpy, addon, face_server.endpoint)
    scene = _camera_scene(bpy)
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    head = scene.pvp.rig.pose.bones["head"]
    for frame, yaw in ((1, -25.0), (2, 0.0), (3, 25.0)):
        head.rotation_euler = (0.0, np.radians(yaw), 0.0)
        head.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_start, scene.frame_end = 1, 3
    scene.frame_set(1)
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = 4, "CPU"
    scene.render.filepath = str(tmp_path / "anim_")
    scene.render.image_settings.file_format = "PNG"
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "shot.blend"))
    addon.runtime.close()
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "shot.blend"))  # on_load connects (preferences' endpoint)
    assert addon.runtime.session is not None and addon.runtime.session.info is not None
    scene = bpy.context.scene
    reader = addon.rig_reader(scene)
    expected = []
    for f in (1, 2, 3):
        scene.frame_set(f)
        controls, edits = reader.now()
        expected.append(server_frame(face_server.endpoint, controls, edits).astype(np.float32))
    scene.frame_set(1)
    calls = []
    fetch = addon.fetch_frame_now

    def counted(scene):
        calls.append(scene.frame_current)
        return fetch(scene)

    addon.fetch_frame_now = counted
    try:
        bpy.ops.render.render(animation=True)
    finally:
        addon.fetch_frame_now = fetch
    assert addon.on_render_pre in bpy.app.handlers.render_pre
    assert calls == [1, 2, 3] and not addon.runtime.rendering
    renders = [load_rgb(tmp_path / f"anim_{f:04d}.png").astype(np.float32) for f in (1, 2, 3)]
    for f, render in enumerate(renders):
        plane = cv2.resize(render[8:56, 8:56], (32, 32), interpolation=cv2.INTER_AREA)  # the plane: central 80%
        errors = [np.abs(plane - cv2.resize(e[1:-1, 1:-1], (32, 32))).mean() for e in expected]
        assert int(np.argmin(errors)) == f and errors[f] < 12.0, errors  # its own frame, not frame 1's
    assert np.abs(renders[0] - renders[2]).mean() > 2.0


def test_render_job_fetches_its_frame_on_its_own_thread(bpy, addon, face_server):
    """Render / Render Animation from the UI run as a job: Blender calls render_pre on the job's thread, before
    each frame, while the main thread's timer keeps pumping the same session. The job's frame is fetched
    under the session's lock (one thread on the socket at a time), put on the plane, and nothing is redrawn
    from the job's thread; the interface is locked while rendering (Blender's advice for handlers that change
    data)."""
    import threading

    connect(bpy, addon, face_server.endpoint)
    scene = _camera_scene(bpy)
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    assert scene.render.use_lock_interface
    head = scene.pvp.rig.pose.bones["head"]
    for frame, yaw in ((1, -25.0), (3, 25.0)):
        head.rotation_euler = (0.0, np.radians(yaw), 0.0)
        head.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_set(1)
    assert bpy.ops.pvp.sync() == {"FINISHED"}
    (controls, edits), = addon.rig_reader(scene).at([3])
    scene.frame_current = 3  # as the job sets it: no frame-change handler on the main thread
    threads = []
    fetch = addon.fetch_frame_now

    def on_thread(scene):
        threads.append(addon.on_main_thread())
        return fetch(scene)

    addon.fetch_frame_now = on_thread
    job = threading.Thread(target=addon.on_render_pre, args=(scene,))
    try:
        job.start()
        while job.is_alive():
            addon.tick()  # the main thread's timer, as during a UI render
            job.join(0.005)
    finally:
        addon.fetch_frame_now = fetch
    assert threads == [False]
    assert "render:" not in addon.runtime.session.status
    np.testing.assert_array_equal(plane_pixels(scene.pvp.image), server_frame(face_server.endpoint, controls, edits))


def _rig_turning_its_head(bpy, addon, endpoint, last_frame):
    """Connected, a rig added, its head keyed from -20° yaw at frame 1 to 20° at last_frame (the scene range)."""
    connect(bpy, addon, endpoint)
    scene = bpy.context.scene
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    head = scene.pvp.rig.pose.bones["head"]
    for frame, yaw in ((1, -20.0), (last_frame, 20.0)):
        head.rotation_euler = (0.0, np.radians(yaw), 0.0)
        head.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_start, scene.frame_end = 1, last_frame
    return scene


def test_cache_range_fills_the_preview_cache(bpy, addon, face_server):
    scene = _rig_turning_its_head(bpy, addon, face_server.endpoint, 12)
    assert bpy.ops.pvp.cache_range() == {"FINISHED"}
    assert addon.runtime.cache_state == "cached 12/12 frames of the range"
    preview, reader = addon.runtime.session.preview, addon.rig_reader(scene)
    for f in (3, 9):  # scrubbing: the frame is there at once, nothing asked of the server
        controls, edits = reader.at([f])[0]
        assert preview.want(controls, edits) is not None and not preview.in_flight


def test_fast_timeline_output_size_is_not_the_preview_size(bpy, addon, face_server, tmp_path):
    connect(bpy, addon, face_server.endpoint)
    scene = bpy.context.scene
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    scene.frame_start, scene.frame_end = 1, 2
    scene.pvp.output_dir, scene.pvp.output_size = str(tmp_path / "out") + "/", 48
    assert bpy.ops.pvp.render_timeline() == {"FINISHED"}
    assert load_rgb(tmp_path / "out" / "frame_000001.png").shape == (48, 48, 3)
    assert tuple(scene.pvp.image.size) == (32, 32)  # the live preview keeps its own size


def test_fast_timeline_on_a_cluster_writes_the_server_paths_frames(bpy, addon, face_server, avatars, tmp_path):
    pytest.importorskip("ray", reason="the cluster extra (pip install 'pvp[cluster]')")
    scene = _rig_turning_its_head(bpy, addon, face_server.endpoint, 3)
    scene.pvp.output_dir = str(tmp_path / "server") + "/"
    assert bpy.ops.pvp.render_timeline() == {"FINISHED"}
    prefs = addon.prefs()
    prefs.cluster, prefs.pvp_command = "local", str(Path(sys.executable).with_name("pvp"))
    try:
        scene.pvp.output_dir = str(tmp_path / "cluster") + "/"
        with pytest.raises(RuntimeError, match="set the avatar folder"):
            bpy.ops.pvp.render_timeline()
        scene.pvp.avatar_dir = str(avatars / "face")
        assert bpy.ops.pvp.render_timeline() == {"FINISHED"}  # pvp render --cluster local, beside "Blender"
    finally:
        prefs.cluster = ""
    assert (tmp_path / "cluster" / "pvp_timeline.json").is_file()
    for f in (1, 2, 3):
        name = f"frame_{f:06d}.png"
        assert_same_render(load_rgb(tmp_path / "cluster" / name), load_rgb(tmp_path / "server" / name))
    assert not np.array_equal(load_rgb(tmp_path / "cluster" / "frame_000001.png"),
                              load_rgb(tmp_path / "cluster" / "frame_000003.png"))


def test_server_killed_during_playback(bpy, addon, avatars):
    endpoint = free_endpoint()
    srv = ServerProcess(avatars / "face", bind=endpoint)
    try:
        connect(bpy, addon, endpoint, timeout_s=0.5)
        assert bpy.ops.pvp.add_rig() == {"FINISHED"}
        scene = bpy.context.scene
        head = scene.pvp.rig.pose.bones["head"]
        for frame, yaw in ((1, -20.0), (30, 20.0)):
            head.rotation_euler = (0.0, np.radians(yaw), 0.0)
            head.keyframe_insert("rotation_euler", frame=frame)
        assert bpy.ops.pvp.sync() == {"FINISHED"}
        srv.stop()
        deadline = time.monotonic() + 5
        frame = 2
        while addon.runtime.session.preview.state != "down" and time.monotonic() < deadline:
            scene.frame_set(frame)  # playback: the handler runs, the timer pumps; nothing may raise
            addon.tick()
            frame += 1
            time.sleep(0.02)
        session = addon.runtime.session
        assert session.preview.state == "down" and "no reply from" in session.status
        for _ in range(5):
            scene.frame_set(frame)
            assert addon.tick() is not None
        srv = ServerProcess(avatars / "face", bind=endpoint)
        scene.frame_set(12)
        deadline = time.monotonic() + 30
        while not (session.preview.state == "connected" and session.preview.idle) and time.monotonic() < deadline:
            addon.tick()
            time.sleep(0.02)
        assert session.preview.state == "connected"
        controls, edits = addon.rig_reader(scene).now()
        np.testing.assert_array_equal(plane_pixels(scene.pvp.image), server_frame(endpoint, controls, edits))
    finally:
        srv.stop()


def test_add_rig_with_the_server_down_does_not_wait(bpy, addon, avatars, monkeypatch, capfd):
    """Add PVP Rig never waits for the server: the avatar's info and face mesh come with the connection, so
    after the server went away the rig still gets the avatar's ranges and face, with a one-line warning; a
    server never reached is one clear error (there is no avatar to build a rig for)."""
    endpoint = free_endpoint()
    srv = ServerProcess(avatars / "face", bind=endpoint)
    try:
        session = connect(bpy, addon, endpoint, timeout_s=0.5)
    finally:
        srv.stop()
    assert session.face_mesh is not None and session.face_mesh["vertex_count"] == 468
    session.preview.want([0.0] * 9)  # a frame nobody answers: the preview finds the server gone
    assert not addon.wait_for_frame(session, bpy.context.scene) and session.preview.state == "down"

    def waits(*_args, **_kwargs):
        raise AssertionError("Add PVP Rig waited for the server")

    monkeypatch.setattr(type(session.client), "_wait", waits)  # every blocking request goes through it
    capfd.readouterr()
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    assert "server not reachable (no reply from" in "".join(capfd.readouterr())
    scene = bpy.context.scene
    assert len(scene.pvp.mesh.data.vertices) == 468  # the avatar's own face, not a proxy
    schema = {c["name"]: c for c in session.info["avatar"]["control_schema"]["channels"]}
    jaw = scene.pvp.rig.pose.bones["jaw"].constraints[0]
    assert np.degrees([jaw.min_x, jaw.max_x]) == pytest.approx([schema["jaw_open"]["min"], schema["jaw_open"]["max"]])

    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.close()
    prefs = addon.prefs()
    prefs.endpoint, prefs.timeout_s = free_endpoint(), 0.3
    session = addon.new_session(bpy.context)  # what Connect does in the UI: send the hello, wait for nothing
    with pytest.raises(RuntimeError, match="no avatar yet: connecting to"):
        bpy.ops.pvp.add_rig()
    assert not addon.wait_for_greeting(session, bpy.context.scene)
    with pytest.raises(RuntimeError, match="no avatar yet: no reply from .* is pvp serve running"):
        bpy.ops.pvp.add_rig()
    assert bpy.context.scene.pvp.rig is None


def test_rig_without_face_model_gets_a_proxy(bpy, addon, avatars):
    srv = ServerProcess(avatars / "proxy")
    try:
        session = connect(bpy, addon, srv.endpoint)
        assert not session.info["avatar"]["has_face_model"]
        assert bpy.ops.pvp.add_rig() == {"FINISHED"}
        keys = bpy.context.scene.pvp.mesh.data.shape_keys.key_blocks
        assert [k.name for k in keys][1:] == ["exp_00", "exp_01", "exp_02", "exp_03"]
    finally:
        srv.stop()
    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.close()
    bpy.context.preferences.addons[PKG].preferences.endpoint = free_endpoint()
    bpy.context.preferences.addons[PKG].preferences.timeout_s = 0.3
    with pytest.raises(RuntimeError, match="no reply from"):
        bpy.ops.pvp.connect()  # server down: one clear error


def test_disable_and_uninstall(bpy, addon_zip):
    user = Path(os.environ["BLENDER_USER_RESOURCES"])
    installed = next(user.rglob("pvp_blender/blender_manifest.toml")).parent
    site = list(user.rglob("site-packages/zmq/__init__.py"))
    assert site, "the bundled pyzmq wheel was not installed"
    bpy.ops.preferences.addon_disable(module=PKG)
    assert hasattr(bpy.types, "PVP_PT_panel") is False and not hasattr(bpy.types.Scene, "pvp")
    with pytest.raises((AttributeError, RuntimeError)):
        bpy.ops.pvp.connect()
    assert bpy.ops.extensions.package_uninstall(repo_index=_repo_index(bpy), pkg_id="pvp_blender") == {"FINISHED"}
    assert not installed.exists()


def _repo_index(bpy) -> int:
    repos = bpy.context.preferences.extensions.repos
    return next(i for i, r in enumerate(repos) if r.module == "user_default")
