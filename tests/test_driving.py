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
    values = driving.to_controls(perf, SCHEMA)
    expected = d12_track.controls(SCHEMA, np.flatnonzero(d12_track.valid))
    got = np.stack([values[n] for n in controls.channel_names(SCHEMA)], 1)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_csv_and_renormalisation(tmp_path):
    rows = ["frame,head_yaw,jaw_open,exp_00,exp_01"] + [f"{i},{i * 2.0},{i % 3},{i / 10},{-i}" for i in range(8)]
    (tmp_path / "drive.csv").write_text("\n".join(rows) + "\n")
    perf = driving.read_performance(tmp_path / "drive.csv")
    values = driving.to_controls(perf, SCHEMA, groups=("head", "jaw", "expression"))
    np.testing.assert_allclose(values["head_yaw"], np.arange(8) * 2.0)
    assert sorted(values) == ["exp_00", "exp_01", "head_yaw", "jaw_open"]  # only the columns the file has
    stats = {"mean": [5.0, 0.0] + [1.0] * 4, "std": [2.0, 1.0] + [0.5] * 4}
    norm = driving.to_controls(perf, SCHEMA, groups=("jaw", "expression"), renormalize=True, avatar_stats=stats)
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
