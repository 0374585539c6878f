"""Driving-performance readers (pvp_contract/driving.py, shared with the Blender extension)."""
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvp_contract import controls, driving
from pvp_contract.geometry import axis_angle_from_rotation, rot_x, rot_y, rotation_from_ypr

SCHEMA = controls.schema(4, (-40, 40), (-30, 30), (0, 30))
YPR = np.array([[10.0, -5.0, 3.0], [-20.0, 8.0, -4.0], [0.0, 0.0, 0.0]])
JAW = np.array([[12.0, 1.0], [3.0, -2.0], [0.0, 0.0]])
EXP = np.arange(3 * 6, dtype=np.float64).reshape(3, 6) / 10


def _axis_angles(ypr):
    return np.stack([axis_angle_from_rotation(rotation_from_ypr(*v)) for v in ypr])


def _jaw_pose(jaw_deg):
    return np.concatenate([np.radians(jaw_deg), np.zeros((len(jaw_deg), 1))], 1)


def _check(perf, n=3):
    assert len(perf) == n and perf.valid.all()
    np.testing.assert_allclose(perf.head, YPR, atol=1e-6)
    np.testing.assert_allclose(perf.jaw, JAW, atol=1e-6)
    np.testing.assert_allclose(perf.expression[:, :6], EXP, atol=1e-6)


def test_deca_npz_and_emoca_folder(tmp_path):
    pose = np.concatenate([_axis_angles(YPR), _jaw_pose(JAW)], 1)
    np.savez(tmp_path / "codes.npz", pose=pose, exp=EXP, shape=np.zeros((3, 100)))
    _check(driving.read_performance(tmp_path / "codes.npz"))
    for i in range(3):
        d = tmp_path / "emoca" / f"{i:06d}"
        d.mkdir(parents=True)
        np.save(d / "pose.npy", pose[i:i + 1])
        np.save(d / "exp.npy", EXP[i:i + 1])
    perf = driving.read_performance(tmp_path / "emoca")
    assert perf.kind == "emoca"
    _check(perf)


def test_nha_npz_composes_neck_and_global_rotation(tmp_path):
    neck = _axis_angles(np.array([[5.0, 0, 0], [0, 4.0, 0], [0, 0, 0]]))
    glob = np.stack([axis_angle_from_rotation(
        rotation_from_ypr(*v) @ rotation_from_ypr(*n).T) for v, n in zip(YPR, [[5.0, 0, 0], [0, 4.0, 0], [0, 0, 0]])])
    np.savez(tmp_path / "tracking.npz", rotation=glob, neck_pose=neck, jaw_pose=_jaw_pose(JAW), expr=EXP,
             translation=np.zeros((3, 3)))
    _check(driving.read_performance(tmp_path / "tracking.npz"))


def test_metrical_tracker_frames_read_without_torch(tmp_path):
    import torch

    d = tmp_path / "checkpoint"
    d.mkdir()
    flip = np.diag([1.0, -1.0, -1.0])
    for i in range(3):
        jaw_R = rotation_from_ypr(0, 0, 0) @ rot_x(np.radians(JAW[i, 0])) @ rot_y(np.radians(JAW[i, 1]))
        six = jaw_R[:2].reshape(-1)  # pytorch3d's matrix_to_rotation_6d: the first two rows
        frame = {"flame": {"exp": torch.tensor(EXP[i:i + 1], dtype=torch.float32),
                           "jaw": torch.tensor(six[None], dtype=torch.float32), "shape": torch.zeros(1, 300)},
                 "opencv": {"R": torch.tensor((flip @ rotation_from_ypr(*YPR[i]))[None], dtype=torch.float32)},
                 "frame_id": i}
        torch.save(frame, d / f"{i:05d}.frame")
    perf = driving.read_performance(tmp_path)
    assert perf.kind == "metrical-tracker"
    np.testing.assert_allclose(perf.head, YPR, atol=1e-4)
    np.testing.assert_allclose(perf.expression, EXP, atol=1e-6)
    np.testing.assert_allclose(perf.jaw[:, 0], JAW[:, 0], atol=0.2)  # xy Euler vs axis-angle: close, not equal


def test_pickles_with_other_globals_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "codes.pkl").write_bytes(pickle.dumps({"pose": Evil()}))
    with pytest.raises(driving.DrivingError, match=r"codes.pkl: refusing to unpickle .*system"):
        driving.read_performance(tmp_path / "codes.pkl")
    assert not (tmp_path / "pwned").exists()
    pose = np.concatenate([_axis_angles(YPR), _jaw_pose(JAW)], 1)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"pose": pose, "exp": EXP}))
    _check(driving.read_performance(tmp_path / "ok.pkl"))


def test_pvp_track_matches_the_server_reader(d12_track, tmp_path):
    d12_track.save(tmp_path / "t.safetensors")
    perf = driving.read_performance(tmp_path / "t.safetensors")
    assert perf.fps == d12_track.fps and len(perf) == len(d12_track)
    converted = driving.to_controls(perf, SCHEMA)
    expected = d12_track.controls(SCHEMA, np.flatnonzero(d12_track.valid))
    got = np.stack([converted.columns[n] for n in controls.channel_names(SCHEMA)], 1)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(converted.frames, d12_track.frame_index[d12_track.valid])
    assert perf.expression_basis == "avatar" and not converted.notes


def test_csv_and_renormalisation(tmp_path):
    rows = ["frame,head_yaw,jaw_open,exp_00,exp_01"] + [f"{i},{i * 2.0},{i % 3},{i / 10},{-i}" for i in range(8)]
    (tmp_path / "drive.csv").write_text("\n".join(rows) + "\n")
    perf = driving.read_performance(tmp_path / "drive.csv")
    values = driving.to_controls(perf, SCHEMA, groups=("head", "jaw", "expression")).columns
    np.testing.assert_allclose(values["head_yaw"], np.arange(8) * 2.0)
    assert sorted(values) == ["exp_00", "exp_01", "head_yaw", "jaw_open"]  # only the columns the file has
    stats = {"mean": [5.0, 0.0] + [1.0] * 4, "std": [2.0, 1.0] + [0.5] * 4}
    norm = driving.to_controls(perf, SCHEMA, groups=("jaw", "expression"), renormalize=True,
                               avatar_stats=stats).columns
    assert "head_yaw" not in norm
    for name, i in (("jaw_open", 0), ("exp_01", 3)):
        raw = values[name]
        np.testing.assert_allclose(norm[name], (raw - raw.mean()) / raw.std() * stats["std"][i] + stats["mean"][i])
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(driving.DrivingError, match="bad.csv"):
        driving.read_performance(tmp_path / "bad.csv")


@pytest.mark.parametrize("name, content, message", [
    ("t.safetensors", b"\x05", "too short"),
    ("t.npz", None, "no FLAME codes"),
    ("t.xyz", b"", "unknown driving file type"),
])
def test_bad_files_name_themselves(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.savez(path, something=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(driving.DrivingError, match=message) as err:
        driving.read_performance(path)
    assert name in str(err.value)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 50), src=st.sampled_from([24.0, 25.0, 30.0, 60.0]), dst=st.sampled_from([24.0, 25.0, 30.0]))
def test_resample_keeps_duration_and_end_points(n, src, dst):
    values = np.stack([np.arange(n, dtype=float), np.sin(np.arange(n))], 1)
    out = driving.resample(values, src, dst)
    assert len(out) == int(np.floor((n - 1) * dst / src + 1e-9)) + 1
    np.testing.assert_allclose(out[0], values[0])
    np.testing.assert_allclose(out[:, 0], np.arange(len(out)) * src / dst, atol=1e-9)  # linear channel stays linear


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    got, meta = driving.read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


def test_zip_without_data_pkl_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pt", "w") as z:
        z.writestr("something.txt", "hi")
    with pytest.raises(driving.DrivingError, match="x.pt: a zip file without data.pkl"):
        driving.read_performance(tmp_path / "x.pt")


# --- timing, formats and conventions of reenactment imports ------------------------------------------------

def test_frame_numbers_come_from_each_format(tmp_path):
    rows = ["frame,head_yaw,jaw_open"] + [f"{f},{f * 1.0},{f % 5}" for f in range(1, 60, 2)]
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    np.testing.assert_array_equal(driving.read_performance(tmp_path / "take.csv").frames, np.arange(1, 60, 2))
    pose = np.concatenate([_axis_angles(YPR), _jaw_pose(JAW)], 1)
    np.savez(tmp_path / "nha.npz", rotation=_axis_angles(YPR), neck_pose=np.zeros((3, 3)), jaw_pose=np.zeros((3, 3)),
             expr=EXP, frame=np.array([4, 6, 9]))
    np.testing.assert_array_equal(driving.read_performance(tmp_path / "nha.npz").frames, [4, 6, 9])
    for name, row in (("000010_000", 0), ("000010_001", 1), ("000012_000", 2)):  # frame 10 has a second face
        d = tmp_path / "emoca" / name
        d.mkdir(parents=True)
        np.save(d / "pose.npy", pose[row:row + 1])
        np.save(d / "exp.npy", EXP[row:row + 1])
    emoca = driving.read_performance(tmp_path / "emoca")
    np.testing.assert_array_equal(emoca.frames, [10, 12])  # one frame per frame number, the first face's
    np.testing.assert_allclose(emoca.head, YPR[[0, 2]], atol=1e-6)


def test_metrical_tracker_checkpoints_of_numpy_arrays_read_safely(tmp_path):
    import torch

    d = tmp_path / "checkpoint"
    d.mkdir()
    for i in (3, 5):  # torch.save of numpy arrays: protocol 2, bytes as _codecs.encode(..., 'latin1')
        frame = {"flame": {"exp": EXP[:1].astype(np.float32), "jaw": np.eye(3)[:2].reshape(1, 6).astype(np.float32)},
                 "opencv": {"R": np.diag([1.0, -1.0, -1.0])[None].astype(np.float32)}, "frame_id": i}
        torch.save(frame, d / f"{i:05d}.frame")
    perf = driving.read_performance(tmp_path)
    np.testing.assert_array_equal(perf.frames, [3, 5])
    np.testing.assert_allclose(perf.head, 0, atol=1e-5)
    np.testing.assert_allclose(perf.expression[0], EXP[0], atol=1e-6)


def test_nha_rotation_limits_are_applied(tmp_path):
    closed = np.arctanh(2 * 5 / 65 - 1)  # what video-head-tracker stores for a 0 degree jaw (limits -5..60)
    # its camera frame is PyTorch3D's (X left, Z into the scene), pvp's turned by pi about Y: a face looking at
    # the camera is Ry(pi) there, and one turned 20 degrees to image right Ry(pi) Ry(20 degrees)
    facing = np.stack([axis_angle_from_rotation(rot_y(np.pi) @ rot_y(np.radians(a))) for a in (0.0, 20.0)])
    np.savez(tmp_path / "tracked_flame_params.npz", rotation=facing, neck_pose=np.zeros((2, 3)),
             jaw_pose=np.array([[closed, 0.0, 0.0], [0.0, 0.0, 0.0]]), expr=EXP[:2], frame=np.array([0, 1]),
             n_processed=np.array(2))
    perf = driving.read_performance(tmp_path / "tracked_flame_params.npz")
    np.testing.assert_allclose(perf.jaw[:, 0], [0.0, 27.5], atol=1e-6)  # not -71 degrees
    np.testing.assert_allclose(perf.head, [[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]], atol=1e-6)  # neck 0 after its limits


def test_renormalisation_leaves_near_constant_channels_alone():
    rng = np.random.default_rng(0)
    jaw = np.stack([rng.uniform(0, 20, 200), rng.normal(0, 0.1, 200)], 1)  # lateral: 0.1 degree of noise
    perf = driving.Performance("take.csv", "csv", None, None, jaw, None, np.ones(200, bool),
                               expression_basis="avatar")
    stats = {"mean": [5.0, 0.3, 0, 0, 0, 0], "std": [4.0, 1.2, 1, 1, 1, 1]}
    out = driving.to_controls(perf, SCHEMA, ("jaw",), renormalize=True, avatar_stats=stats)
    assert out.columns["jaw_open"].std() == pytest.approx(4.0)
    assert out.columns["jaw_lateral"].std() == pytest.approx(jaw[:, 1].std())  # not blown up to 1.2
    assert out.columns["jaw_lateral"].mean() == pytest.approx(0.3)
    assert any("jaw_lateral" in n for n in out.notes)


def test_flame_expressions_drive_the_avatar_only_through_a_map(tmp_path):
    pose = np.concatenate([_axis_angles(YPR), _jaw_pose(JAW)], 1)
    np.savez(tmp_path / "deca.npz", pose=pose, exp=EXP)
    perf = driving.read_performance(tmp_path / "deca.npz")
    plain = driving.to_controls(perf, SCHEMA)
    assert not any(n.startswith("exp_") for n in plain.columns) and "head_yaw" in plain.columns
    assert "deca.npz" in plain.notes[0] and "FLAME" in plain.notes[0]
    weights = np.zeros((4, 6))
    weights[0, 5] = 2.0  # the avatar's exp_00 follows FLAME coefficient 5
    mapped = driving.to_controls(perf, SCHEMA, expression_map={"weights": weights.tolist(), "bias": [0.5] * 4})
    np.testing.assert_allclose(mapped.columns["exp_00"], 2.0 * EXP[:, 5] + 0.5)
    fitted = controls.fit_expression_map(EXP, EXP[:, ::-1][:, :4] * 3 + 1, ridge=1e-9)
    np.testing.assert_allclose(controls.apply_expression_map(fitted, EXP), EXP[:, ::-1][:, :4] * 3 + 1, atol=1e-5)


def test_a_track_without_any_face_is_a_clear_error(tmp_path):
    (tmp_path / "empty.csv").write_text("frame,head_yaw\n1,\n2,\n")
    perf = driving.read_performance(tmp_path / "empty.csv")
    with pytest.raises(driving.DrivingError, match=r"empty.csv: no frame with a face"):
        driving.to_controls(perf, SCHEMA)


def test_csv_expression_names_without_padding(tmp_path):
    (tmp_path / "take.csv").write_text("exp_3,exp_000\n0.5,1.5\n-0.5,2.5\n")
    out = driving.to_controls(driving.read_performance(tmp_path / "take.csv"), SCHEMA)
    np.testing.assert_allclose(out.columns["exp_03"], [0.5, -0.5])
    np.testing.assert_allclose(out.columns["exp_00"], [1.5, 2.5])


def test_expression_map_is_fitted_on_the_avatars_own_video(d12_track, tmp_path):
    import json
    import subprocess
    import sys

    from pvp.avatar import Avatar, random_avatar
    from pvp.serve.render_service import RenderService

    avatar_dir = tmp_path / "avatar"
    random_avatar(resolution=32, expression_dim=4).save(avatar_dir)
    (avatar_dir / "work").mkdir()
    d12_track.save(avatar_dir / "work" / "track.safetensors")
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 10))  # FLAME codes: another basis of the same motion
    flame = d12_track.expression[:, :4] @ mix
    pose = np.zeros((len(d12_track), 6))
    np.savez(tmp_path / "deca_own_video.npz", pose=pose, exp=flame, frame=d12_track.frame_index)
    r = subprocess.run([sys.executable, "-m", "pvp.cli", "expression-map", str(avatar_dir),
                        str(tmp_path / "deca_own_video.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stored = json.loads((avatar_dir / "avatar.json").read_text())["expression_maps"]["flame"]
    assert stored["frames"] == int(d12_track.valid.sum()) and min(stored["r2"]) > 0.99
    info = RenderService(Avatar.load(avatar_dir)).info()
    assert info["avatar"]["expression_maps"]["flame"]["weights"] == stored["weights"]
    perf = driving.read_performance(tmp_path / "deca_own_video.npz")
    mapped = driving.to_controls(perf, controls.schema(4, (-40, 40), (-30, 30), (0, 30)), ("expression",),
                                 expression_map=stored)
    np.testing.assert_allclose(mapped.columns["exp_02"], d12_track.expression[d12_track.valid, 2], atol=0.05)
    r = subprocess.run([sys.executable, "-m", "pvp.cli", "expression-map", str(avatar_dir), str(tmp_path / "no.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no.npz: no such file" in r.stderr and "Traceback" not in r.stderr


def test_nha_frames_the_tracker_never_processed_are_not_a_take(tmp_path):
    np.savez(tmp_path / "tracked_flame_params.npz", rotation=np.zeros((3, 3)), neck_pose=np.zeros((3, 3)),
             jaw_pose=np.zeros((3, 3)), expr=EXP, frame=np.array([0, 1, 2]), n_processed=np.array(2))
    assert driving.read_performance(tmp_path / "tracked_flame_params.npz").valid.tolist() == [True, True, False]


def test_tensors_reaching_past_their_storage_are_refused(tmp_path):
    import torch

    torch.save({"pose": torch.zeros(3, 6), "exp": torch.zeros(3, 10)}, tmp_path / "codes.pt")
    data = zipfile.ZipFile(tmp_path / "codes.pt")
    names = {n: data.read(n) for n in data.namelist()}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    # the same file, one tensor claiming 1000 rows of the 3 its storage holds
    assert names[pkl].count(b"K\x03K\x06\x86") == 1  # the size (3, 6) as protocol 2 writes it
    names[pkl] = names[pkl].replace(b"K\x03K\x06\x86", b"M\xe8\x03K\x06\x86")  # (1000, 6)
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        for n, d in names.items():
            z.writestr(n, d)
    with pytest.raises(driving.DrivingError, match="evil.pt"):
        driving.read_performance(tmp_path / "evil.pt")


def test_a_blank_cell_drops_its_frame_only_for_its_own_group(tmp_path):
    (tmp_path / "take.csv").write_text("frame,head_yaw,exp_00\n0,1.0,0.5\n1,2.0,\n2,3.0,0.7\n")
    perf = driving.read_performance(tmp_path / "take.csv")
    head = driving.to_controls(perf, SCHEMA, ("head",))
    np.testing.assert_array_equal(head.frames, [0, 1, 2])
    both = driving.to_controls(perf, SCHEMA)
    np.testing.assert_array_equal(both.frames, [0, 2])
    np.testing.assert_allclose(both.columns["exp_00"], [0.5, 0.7])
