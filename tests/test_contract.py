"""The torch-free contract (pvp_contract) and the extension's pure modules: import hygiene, the control
schema's one conversion, clamp and renormalisation, and the extension zip carrying the contract as a wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blender_addon.timeline import frame_range, frames_ahead, runs_of_equal_edits
from blender_addon.track_import import decimate, key_table, smooth
from pvp_contract import controls

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = controls.schema(3, (-30, 30), (-20, 20), (0, 25))


def test_contract_and_extension_modules_never_import_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "import pvp_contract.atomic, pvp_contract.client, pvp_contract.controls, pvp_contract.driving,"
            " pvp_contract.geometry, pvp_contract.protocol;"
            "import blender_addon.preview, blender_addon.rig, blender_addon.session, blender_addon.timeline,"
            " blender_addon.track_import;"
            "heavy = sorted(m for m in ('torch', 'cv2', 'mediapipe', 'safetensors', 'pvp') if m in sys.modules);"
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_control_matrix_is_in_schema_order_with_named_columns():
    n = 4
    head = np.arange(n * 3, dtype=float).reshape(n, 3)
    jaw = 100 + np.arange(n * 2, dtype=float).reshape(n, 2)
    expression = 200 + np.arange(n * 5, dtype=float).reshape(n, 5)  # more coefficients than the avatar's 3
    m = controls.control_matrix(SCHEMA, head, jaw, expression)
    assert m.shape == (n, 8) and m.dtype == np.float32
    np.testing.assert_array_equal(m[:, controls.HEAD_COLUMNS], head)
    np.testing.assert_array_equal(m[:, controls.ROLL], head[:, 2])
    np.testing.assert_array_equal(m[:, controls.JAW_COLUMNS], jaw)
    np.testing.assert_array_equal(m[:, controls.EXPRESSION_COLUMNS], expression[:, :3])
    np.testing.assert_array_equal(m[:, controls.FACE_COLUMNS], np.concatenate([jaw, expression[:, :3]], 1))
    assert controls.channel_names(SCHEMA)[controls.JAW_LATERAL] == "jaw_lateral"
    with pytest.raises(ValueError, match="2 expression coefficients, the avatar needs 3"):
        controls.control_matrix(SCHEMA, head, jaw, expression[:, :2])


def test_jaw_degrees_and_expression_names():
    np.testing.assert_allclose(controls.jaw_degrees([[np.pi / 2, -np.pi / 4, 1.0]]), [[90.0, -45.0]])
    assert controls.expression_names(3) == ["exp_00", "exp_01", "exp_02"]
    assert controls.expression_index("exp_12") == 12 and controls.expression_index("jaw_open") is None
    assert controls.face_stats_index(SCHEMA) == {"jaw_open": 0, "jaw_lateral": 1, "exp_00": 2, "exp_01": 3,
                                                 "exp_02": 4}


def test_ranges_bound_every_default():
    lo, hi = controls.ranges(controls.schema(2, (5, 30), (-20, -2), (1, 25)))
    defaults = np.array(controls.defaults(controls.schema(2, (5, 30), (-20, -2), (1, 25))))
    assert lo.dtype == np.float32 and (lo <= defaults).all() and (defaults <= hi).all()
    assert defaults[controls.YAW] == 5 and defaults[controls.PITCH] == -2


@settings(max_examples=50, deadline=None)
@given(st.floats(-5, 5), st.floats(0.1, 10), st.lists(st.floats(-3, 3), min_size=3, max_size=3),
       st.lists(st.floats(0.05, 4), min_size=3, max_size=3))
def test_renormalisation_maps_statistics(shift, spread, target_mean, target_std):
    values = shift + spread * np.random.default_rng(0).normal(size=(300, 3))
    out = controls.renormalize(values, target_mean, target_std)
    np.testing.assert_allclose(out.mean(0), target_mean, atol=1e-9)
    np.testing.assert_allclose(out.std(0), target_std, rtol=1e-9)


def test_frames_ahead_wrap_around_the_range():
    assert frames_ahead(9, 1, 10, 1, 4) == [10, 1, 2, 3]
    assert frames_ahead(7, 1, 10, 2, 3) == [9, 1, 3]
    assert frames_ahead(5, 5, 5, 1, 2) == [5, 5]
    assert frame_range(3, 9, 0) == [3, 4, 5, 6, 7, 8, 9] and frame_range(1, 9, 4) == [1, 5, 9]


def test_runs_of_equal_edits_split_where_edits_change():
    frames = [(1, [0.0], {}), (2, [1.0], {}), (3, [2.0], {"smile": 1.0}), (4, [3.0], {"smile": 1.0}), (5, [4.0], {})]
    runs = runs_of_equal_edits(frames)
    assert [e for e, _ in runs] == [{}, {"smile": 1.0}, {}]
    assert [[f for f, _ in part] for _, part in runs] == [[1, 2], [3, 4], [5]]
    assert runs[1][1][1] == (4, [3.0])


def test_key_table_places_track_frames_from_the_start_frame(tmp_path):
    path = tmp_path / "take.csv"
    path.write_text("head_yaw,jaw_open,exp_01\n1,2,0.5\n3,4,-0.5\n5,6,0.0\n")
    keys = key_table(path, SCHEMA, controls.GROUPS, False, None, start_frame=11, scene_fps=25.0)
    assert keys.names == ["head_yaw", "jaw_open", "exp_01"]  # only the channels the file gives
    np.testing.assert_array_equal(keys.frames, [11, 12, 13])
    np.testing.assert_array_equal(keys.values, [[1, 2, 0.5], [3, 4, -0.5], [5, 6, 0.0]])
    head_only = key_table(path, SCHEMA, ("head",), False, None, start_frame=1, scene_fps=25.0)
    assert head_only.names == ["head_yaw"]
    stats = {"mean": [10.0, 0.0, 0.0, 1.0, 0.0], "std": [2.0, 1.0, 1.0, 0.5, 1.0]}
    renorm = key_table(path, SCHEMA, ("jaw", "expression"), True, stats, start_frame=1, scene_fps=25.0)
    np.testing.assert_allclose(renorm.values.mean(0), [10.0, 1.0])  # jaw_open and exp_01 of the avatar's stats
    np.testing.assert_allclose(renorm.values.std(0), [2.0, 0.5])


def test_key_table_keeps_source_frame_numbers_and_gaps(tmp_path):
    rows = ["frame,head_yaw"] + [f"{f},{'' if 21 <= f <= 29 else f * 1.0}" for f in range(1, 60, 2)]
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    keys = key_table(tmp_path / "take.csv", SCHEMA, ("head",), False, None, start_frame=1, scene_fps=25.0)
    kept = [f for f in range(1, 60, 2) if not 21 <= f <= 29]
    np.testing.assert_array_equal(keys.frames, kept)  # stride 2 stays stride 2; the gap is not closed
    np.testing.assert_array_equal(keys.values[:, 0], kept)
    assert keys.hold_after.tolist() == [f == 19 for f in kept]  # the key before the gap holds
    assert keys.frame_range == (1, 59) and any("1 gap" in n for n in keys.notes)
    late = key_table(tmp_path / "take.csv", SCHEMA, ("head",), False, None, start_frame=200, scene_fps=25.0)
    np.testing.assert_array_equal(late.frames, np.array(kept) + 199)


def test_key_table_resamples_each_run_by_the_frame_rates(tmp_path):
    rows = ["frame,head_yaw"] + [f"{f},{'' if f == 6 else f * 3.0}" for f in range(12)]
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    keys = key_table(tmp_path / "take.csv", SCHEMA, ("head",), False, None, start_frame=1, scene_fps=25.0,
                     source_fps=50.0)
    # 50 fps onto 25: frames 0-5 span scene frames 1..3.5, frames 7-11 span 4.5..6.5
    np.testing.assert_array_equal(keys.frames, [1, 2, 3, 5, 6])
    np.testing.assert_allclose(keys.values[:, 0], [0, 6, 12, 24, 30])  # source frame 2 * (scene - 1), times 3
    assert keys.hold_after.tolist() == [False, False, True, False, False]


def test_decimation_keeps_what_a_line_cannot_reproduce(tmp_path):
    frames = np.arange(10, dtype=float)
    values = np.array([0, 1, 2, 3, 4, 4, 4, 4, 10, 10], float)  # two ramps, a plateau, a jump
    keep = decimate(frames, values, 0.01)
    assert np.flatnonzero(keep).tolist() == [0, 4, 7, 8, 9]
    np.testing.assert_allclose(np.interp(frames, frames[keep], values[keep]), values)  # nothing visible lost
    rows = ["frame,head_yaw,exp_00"] + [f"{f},{f * 0.5 if f != 5 else ''},{0.3}" for f in range(10)]
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    keys = key_table(tmp_path / "take.csv", SCHEMA, controls.GROUPS, False, None, start_frame=1, scene_fps=25.0)
    frames_yaw, values_yaw, hold = keys.channel_keys(0, decimated=True)
    assert frames_yaw.tolist() == [1, 5, 7, 10] and hold.tolist() == [False, True, False, False]  # gap edges kept
    assert keys.channel_keys(1, decimated=True)[0].tolist() == [1, 5, 7, 10]
    assert len(keys.channel_keys(0)[0]) == 9  # without decimation, every key


def test_frames_missing_from_the_file_are_gaps_too(tmp_path):
    rows = ["frame,head_yaw"] + [f"{f},{f * 1.0}" for f in [*range(1, 11), *range(20, 31)]]  # 11..19 left out
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    keys = key_table(tmp_path / "take.csv", SCHEMA, ("head",), False, None, start_frame=1, scene_fps=25.0)
    assert keys.hold_after.tolist() == [f == 10 for f in [*range(1, 11), *range(20, 31)]]
    assert any("1 gap" in n for n in keys.notes)


def test_downsampled_runs_never_key_one_frame_twice(tmp_path):
    rows = ["frame,head_yaw"] + [f"{f},{'' if f % 2 else f * 1.0}" for f in range(12)]  # face, no face, ...
    (tmp_path / "take.csv").write_text("\n".join(rows) + "\n")
    keys = key_table(tmp_path / "take.csv", SCHEMA, ("head",), False, None, start_frame=1, scene_fps=24.0,
                     source_fps=60.0)
    assert len(set(keys.frames.tolist())) == len(keys.frames) and np.all(np.diff(keys.frames) > 0)


def test_smoothing_keeps_runs_apart_and_leaves_raw_when_off():
    values = np.array([[0.0], [0.0], [10.0], [0.0], [0.0]])
    assert np.array_equal(smooth(values, 0.0), values)
    smoothed = smooth(values, 1.0)
    assert smoothed[2, 0] < 10 and smoothed[1, 0] > 0 and smoothed.sum() == pytest.approx(values.sum(), rel=0.05)


def test_extension_zip_carries_the_contract_as_a_wheel(addon_zip, tmp_path):
    with zipfile.ZipFile(addon_zip) as z:
        names = z.namelist()
        manifest = z.read("blender_manifest.toml").decode()
    wheel = next(n for n in names if n.startswith("wheels/pvp_contract-"))
    assert wheel.endswith("-py3-none-any.whl") and f'"./{wheel}"' in manifest
    top_level = {n for n in names if "/" not in n}
    assert not top_level & {"protocol.py", "client.py", "driving.py", "geometry.py", "atomic.py", "controls.py"}
    assert {"__init__.py", "bl_ops.py", "rig.py", "track_import.py", "rigs/flame_pvp.json"} <= set(names)
    with zipfile.ZipFile(addon_zip) as z:
        z.extract(wheel, tmp_path)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                        str(target), str(tmp_path / wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # a valid wheel (pip checks its RECORD)
    sources = {p.name: p.read_bytes() for p in (target / "pvp_contract").glob("*.py")}
    assert sources == {p.name: p.read_bytes() for p in (ROOT / "pvp_contract").glob("*.py")}


def test_the_wheel_cache_of_extension_builds_holds_whole_wheels_only(monkeypatch, tmp_path):
    """Two builds share --wheels-cache (pytest -n 2 builds one per worker): a wheel is in the cache only once it
    is whole, and an interrupted build leaves the one there as it was."""
    from pvp import extension

    cache = tmp_path / "cache"
    platform = extension.current_platform()
    folder = cache / platform
    seen_while_downloading = []

    def pip_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        for requirement in extension.REQUIREMENTS:
            name, version = requirement.split("==")
            (dest / f"{name}-{version}-cp311-cp311-any.whl").write_bytes(b"half")
            seen_while_downloading.append(sorted(p.name for p in folder.glob("*.whl")))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(extension.subprocess, "run", pip_download)
    wheels = extension.fetch_wheels(platform, cache)
    assert seen_while_downloading == [[]] * len(extension.REQUIREMENTS)
    assert sorted(wheels) == sorted(folder.glob("*.whl")) and all(w.read_bytes() == b"half" for w in wheels)
    assert not list(folder.glob(".*"))

    whole = extension.contract_wheel(cache / "contract", "1.0")
    before = whole.read_bytes()

    class Interrupted(Exception):
        pass

    def failing_write(self, *args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_write)
    with pytest.raises(Interrupted):
        extension.contract_wheel(cache / "contract", "1.0")
    assert whole.read_bytes() == before and list(whole.parent.iterdir()) == [whole]
