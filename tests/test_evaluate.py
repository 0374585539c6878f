"""`pvp eval`: held-out metrics, baselines, re-tracking, CSV and report."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pvp.models.losses import psnr, ssim
from tests.official_layouts import random_generator, write_rosinality_pt

ROOT = Path(__file__).resolve().parents[1]


def random_controls(schema: dict, n: int, seed: int = 0) -> np.ndarray:
    """Uniform controls in the schema's ranges (roll 0)."""
    from pvp_contract import controls

    lo, hi = controls.ranges(schema)
    ctrl = lo + (hi - lo) * np.random.default_rng(seed).random((n, len(lo)), dtype=np.float32)
    ctrl[:, controls.ROLL] = 0.0
    return ctrl


def _pvp(*args):
    return subprocess.run([sys.executable, "-m", "pvp.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def fitted(d3_track, tmp_path_factory):
    """A quick fit on lp_d3's first 30 frames (a random 32 px prior, few steps): small, but a real bundle."""
    d = tmp_path_factory.mktemp("evalfit")
    d3_track.save(d / "d3.safetensors")
    write_rosinality_pt(random_generator(resolution=32, channels=(32, 32, 32, 16), w_dim=32), d / "g.pt")
    r = _pvp("fit", d / "d3.safetensors", "-o", d / "avatar", "--prior", d / "g.pt", "--train-frames", "0:30",
             "--device", "cpu", "--set", "pivots=4", "--set", "invert_w_steps=3", "--set", "invert_wplus_steps=3",
             "--set", "pti_steps_per_pivot=2", "--set", "mapper_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "avatar"


def test_eval_writes_csv_summary_and_report(fitted, real_data, tmp_path):
    r = _pvp("eval", fitted, "--video", real_data / "lp_d3.mp4", "--frames", "30:50", "--mask", "face",
             "-o", tmp_path / "eval", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LPIPS: not computed: pass --vgg" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    names = ("avatar", "nearest_pivot", "nearest_frame", "nearest_pose_frame")
    methods = {m: [x for x in rows if x["method"] == m] for m in names}
    assert all(len(v) == 20 for v in methods.values())
    assert [int(x["frame"]) for x in methods["avatar"]] == list(range(30, 50))
    for x in rows:
        assert 0 < float(x["psnr"]) < 60 and -1 <= float(x["ssim"]) <= 1
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["evaluated_frames"] == 20 and summary["mask"] == "face"
    assert set(summary["methods"]) == {*names, "ground_truth_retracked"}
    for method in names:
        psnrs = sorted(float(x["psnr"]) for x in methods[method])
        assert summary["methods"][method]["psnr_worst10"] == pytest.approx(np.mean(psnrs[:2]), rel=1e-4)
        sharp = [float(x["sharpness"]) for x in methods[method]]
        assert summary["methods"][method]["sharpness"] == pytest.approx(np.mean(sharp), rel=1e-4)
    assert summary["sharpness"]["per_slider"].keys() >= {"head_yaw", "head_pitch", "jaw_open", "exp_00"}
    assert 0 < summary["sharpness"]["recombined"] and summary["clamped"]["of"] == 20
    assert summary["sharpness"]["region"] == "face"  # --mask face: the probes' sharpness inside the face too
    assert "sharpness inside the face / real training frames" in r.stdout
    for method in ("avatar", "nearest_pivot", "nearest_frame"):  # the summary holds the medians of the CSV's rows
        for name in ("yaw_err", "pitch_err"):
            column = [float(x[name]) for x in methods[method]]
            assert len(set(column)) > 1  # one value per frame, not a constant
            assert summary["methods"][method][name] == pytest.approx(np.median(column), rel=1e-4, abs=1e-4)
    for name in ("yaw_shift", "pitch_shift", "size_shift"):
        column = [float(x[name]) for x in methods["avatar"]]
        assert summary["methods"]["avatar"][name] == pytest.approx(np.median(column), rel=1e-4, abs=1e-4)
    assert "yaw_shift" not in summary["methods"]["nearest_frame"]  # a real crop takes no controls
    assert methods["nearest_pivot"][0]["yaw_shift"] == ""
    assert "training frame nearest in head pose" in r.stdout and "clamped requests:" in r.stdout
    clamped = np.array([int(x["clamped"]) for x in methods["avatar"]], bool)
    parts = summary["by_range"]
    assert parts["beyond"]["frames"] == clamped.sum() == summary["clamped"]["frames"]
    assert parts["within"]["frames"] + parts["beyond"]["frames"] == 20
    assert 0 < clamped.sum() < 20  # frames 30:50 hold both kinds of request
    for part, rows in (("within", ~clamped), ("beyond", clamped)):
        mean = np.mean([float(x["psnr"]) for x, c in zip(methods["avatar"], rows) if c])
        assert parts[part]["methods"]["avatar"]["psnr"] == pytest.approx(mean, rel=1e-4)
    assert "within the learned ranges: " in r.stdout
    header = r.stdout.splitlines()[1]
    assert "PSNR worst 10% ↑" in header and "  pitch shift" in header  # the headers stay apart
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "beyond the learned ranges (clamped): " in page
    assert page.count("<img src='data:image/png;base64,") == 5 and "nearest pivot" in page
    for name in ("coverage", "manifold", "metrics", "retrack", "strips"):
        assert (tmp_path / "eval" / f"{name}.png").stat().st_size > 5000
    # the nearest training frame is a real crop of the same video: its pose error is near the tracker's floor
    floor = summary["methods"]["ground_truth_retracked"]["yaw_err"]
    assert summary["methods"]["nearest_frame"]["yaw_err"] < floor + 10


def test_figures_are_split_between_requests_within_and_beyond_the_learned_ranges():
    from pvp.evaluation.evaluate import Evaluation
    from pvp.evaluation.report import console_lines

    result = Evaluation("a", "v.mp4", ":", None, None, None, None, None)
    result.per_frame = {"avatar": {"psnr": np.array([30.0, 20.0, 10.0, 12.0]), "ssim": np.full(4, 0.5),
                                   "yaw_err": np.array([1.0, 2.0, 3.0, 5.0])},
                        "nearest_frame": {"psnr": np.array([25.0, 21.0, 11.0, 11.0]), "ssim": np.full(4, 0.4)}}
    result.beyond_range = np.array([False, False, True, True])
    parts = result.summary_by_range()
    assert (parts["within"]["frames"], parts["beyond"]["frames"]) == (2, 2)
    assert parts["within"]["methods"]["avatar"]["psnr"] == 25.0 and parts["beyond"]["methods"]["avatar"]["psnr"] == 11.0
    assert parts["within"]["methods"]["avatar"]["psnr_worst10"] == 20.0
    assert parts["beyond"]["methods"]["avatar"]["yaw_err"] == 4.0  # errors: medians, as in the whole summary
    assert parts["within"]["methods"]["nearest_frame"]["psnr"] == 23.0
    summary = {"methods": result.summary(), "by_range": parts, "clamped": {"frames": 2, "of": 4, "max_excess": {}},
               "sharpness": {"recombined": 0.9, "slider_sweeps": 0.9, "worst_slider": ["head_yaw", 0.8]}}
    lines = console_lines(summary)
    assert any(line.startswith("avatar (PVP)") and "25.00 (20.00) / 0.500" in line and "11.00 (10.00)" in line
               for line in lines)
    result.beyond_range[:] = False  # nothing clamped: the second part is empty, not an error
    parts = result.summary_by_range()
    assert parts["beyond"] == {"frames": 0, "methods": {}}
    assert console_lines({**summary, "by_range": parts})[-1] == "all 4 frames requested within the learned ranges"


def test_the_tracker_floor_is_given_for_each_part_of_the_frames():
    from pvp.evaluation.evaluate import Evaluation, FrameSet
    from pvp_contract import controls

    ctrl = np.zeros((4, controls.EXPRESSION_COLUMNS.start + 2), np.float32)
    result = Evaluation("a", "v.mp4", ":", None, None, FrameSet(np.arange(4), None, ctrl, None), None, None)
    result.per_frame = {"avatar": {"psnr": np.array([30.0, 20.0, 10.0, 12.0])}}
    result.retracked = {"ground_truth": {"yaw": np.array([1.0, 1.0, 4.0, 4.0]), "pitch": np.zeros(4),
                                         "jaw": np.zeros(4)}}
    result.beyond_range = np.array([False, False, True, True])
    parts = result.summary_by_range()
    assert parts["within"]["methods"]["ground_truth_retracked"]["yaw_err"] == 1.0
    assert parts["beyond"]["methods"]["ground_truth_retracked"]["yaw_err"] == 4.0


def test_expression_only_shifts_are_zero_only_for_a_disentangled_avatar(d3_track):
    from pvp.avatar import random_avatar
    from pvp.evaluation.evaluate import _expression_only_shifts, _render, _retrack
    from pvp.tracking.differentiable import DifferentiableTracker

    tracker = DifferentiableTracker(d3_track.face_model)
    avatar = random_avatar(resolution=64, expression_dim=4)
    controls, donors = random_controls(avatar.meta.schema, 6, seed=1), random_controls(avatar.meta.schema, 9, seed=2)
    shift = _expression_only_shifts(avatar, tracker, controls, donors, _retrack(tracker, _render(avatar, controls)))
    assert shift["yaw_shift"].max() > 0.01 and shift["pitch_shift"].max() > 0.01 and shift["size_shift"].max() > 0.01
    for net in avatar.mappers.expression.nets:  # expression no longer reaches the image
        torch.nn.init.zeros_(net[2].weight)
    shift = _expression_only_shifts(avatar, tracker, controls, donors, _retrack(tracker, _render(avatar, controls)))
    assert shift["yaw_shift"].max() == 0 and shift["pitch_shift"].max() == 0 and shift["size_shift"].max() == 0


def test_masked_metrics_only_see_the_mask():
    a = torch.zeros(1, 3, 32, 32)
    b = a.clone()
    b[..., :, 16:] = 1.0  # differs only on the right half
    left = torch.zeros(1, 1, 32, 32)
    left[..., :, :12] = 1
    assert psnr(a, b, left).item() > 100 and psnr(a, b).item() < 10
    assert ssim(a, b, left).item() == pytest.approx(1.0, abs=1e-4) and ssim(a, b).item() < 0.9


def test_eval_bad_inputs_are_named(fitted, real_data, tmp_path):
    r = _pvp("eval", fitted, "--video", real_data / "lp_d3.mp4", "--frames", "900:950", "-o", tmp_path)
    assert r.returncode == 2 and "--frames '900:950'" in r.stderr
    r = _pvp("eval", fitted, "--video", tmp_path / "nope.mp4", "-o", tmp_path)
    assert r.returncode == 2 and "nope.mp4: no such video" in r.stderr
    np.testing.assert_equal(list(tmp_path.iterdir()), [])


def test_sharpness_falls_with_blur():
    import cv2

    from pvp.evaluation.evaluate import sharpness

    rng = np.random.default_rng(0)
    sharp = cv2.resize((rng.random((64, 64, 3)) * 255).astype(np.uint8), (256, 256), interpolation=cv2.INTER_CUBIC)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    a, b = sharpness(np.stack([sharp, blurred]))
    assert b < 0.5 * a


def test_sharpness_inside_a_mask_sees_only_the_mask():
    """`pvp eval --mask face` measures sharpness inside the face as it does PSNR: a render as sharp as the real
    frame on the face but blurred around it (hair, background) is as sharp there."""
    import cv2

    from pvp.evaluation.evaluate import sharpness

    rng = np.random.default_rng(0)
    real = cv2.resize((rng.random((32, 32, 3)) * 255).astype(np.uint8), (128, 128), interpolation=cv2.INTER_CUBIC)
    face = np.zeros((128, 128), bool)
    face[32:96, 32:96] = True
    render = cv2.GaussianBlur(real, (0, 0), 2.0)
    render[28:100, 28:100] = real[28:100, 28:100]  # a margin: the Laplacian inside the face sees no blur
    whole, inside = sharpness(render[None]) / sharpness(real[None]), sharpness(render[None], face) / sharpness(
        real[None], face[None])
    assert whole < 0.7 and inside == pytest.approx(1.0)


def test_clamped_requests_and_probes_of_the_learned_ranges():
    from pvp.evaluation.evaluate import clamped_requests, range_excess, recombined_controls, slider_sweeps
    from pvp_contract import controls

    schema = controls.schema(2, (-20, 20), (-10, 10), (0.0, 9.0), expression_ranges=[(-1.5, 2.5), (-3.0, 0.5)])
    ctrl = np.zeros((4, controls.EXPRESSION_COLUMNS.start + 2), np.float32)
    ctrl[1, controls.YAW] = 26.0
    ctrl[2, controls.EXPRESSION_COLUMNS.start + 1] = 1.5
    ctrl[3, controls.ROLL] = 40.0  # roll is an image rotation, never clamped
    report = clamped_requests(range_excess(ctrl, schema), schema)
    assert report["frames"] == 2 and report["of"] == 4
    assert report["max_excess"] == {"head_yaw": 6.0, "exp_01": 1.0}
    names, sweeps = slider_sweeps(schema, ctrl[0])
    assert "head_roll" not in names and len(names) == sweeps.shape[0] == ctrl.shape[1] - 1
    yaw = sweeps[names.index("head_yaw")]
    assert yaw[0, controls.YAW] == -20 and yaw[-1, controls.YAW] == 20
    assert np.all(np.delete(yaw, controls.YAW, axis=1) == np.delete(ctrl[0], controls.YAW))  # one slider moves
    train = np.arange(30, dtype=np.float32).reshape(5, 6)
    mixed = recombined_controls(train, 50, seed=1)
    rows_pose = {tuple(r[:2]) for r in train}
    assert all(tuple(r[:2]) in rows_pose for r in mixed) and np.all(mixed[:, controls.ROLL] == 0)
    assert any(r[controls.FACE_COLUMNS][0] != train[train[:, 0] == r[0]][0][controls.FACE_COLUMNS][0] for r in mixed)
