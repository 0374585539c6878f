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
    methods = {m: [x for x in rows if x["method"] == m] for m in ("avatar", "nearest_pivot", "nearest_frame")}
    assert all(len(v) == 20 for v in methods.values())
    assert [int(x["frame"]) for x in methods["avatar"]] == list(range(30, 50))
    for x in rows:
        assert 0 < float(x["psnr"]) < 60 and -1 <= float(x["ssim"]) <= 1
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["evaluated_frames"] == 20 and summary["mask"] == "face"
    assert set(summary["methods"]) == {"avatar", "nearest_pivot", "nearest_frame", "ground_truth_retracked"}
    for method in ("avatar", "nearest_pivot", "nearest_frame"):  # the summary holds the medians of the CSV's rows
        for name in ("yaw_err", "pitch_err"):
            column = [float(x[name]) for x in methods[method]]
            assert len(set(column)) > 1  # one value per frame, not a constant
            assert summary["methods"][method][name] == pytest.approx(np.median(column), rel=1e-4, abs=1e-4)
    for name in ("yaw_shift", "pitch_shift"):
        column = [float(x[name]) for x in methods["avatar"]]
        assert summary["methods"]["avatar"][name] == pytest.approx(np.median(column), rel=1e-4, abs=1e-4)
    assert "yaw_shift" not in summary["methods"]["nearest_frame"]  # a real crop takes no controls
    assert methods["nearest_pivot"][0]["yaw_shift"] == ""
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 5 and "nearest pivot" in page
    for name in ("coverage", "manifold", "metrics", "retrack", "strips"):
        assert (tmp_path / "eval" / f"{name}.png").stat().st_size > 5000
    # the nearest training frame is a real crop of the same video: its pose error is near the tracker's floor
    floor = summary["methods"]["ground_truth_retracked"]["yaw_err"]
    assert summary["methods"]["nearest_frame"]["yaw_err"] < floor + 10


def test_pose_shift_is_zero_only_for_a_disentangled_avatar(d3_track):
    from pvp.avatar import random_avatar
    from pvp.evaluation.evaluate import _pose_shift, _render, _retrack, random_controls
    from pvp.tracking.differentiable import DifferentiableTracker

    tracker = DifferentiableTracker(d3_track.face_model)
    avatar = random_avatar(resolution=64, expression_dim=4)
    controls, donors = random_controls(avatar.meta.schema, 6, seed=1), random_controls(avatar.meta.schema, 9, seed=2)
    shift = _pose_shift(avatar, tracker, controls, donors, _retrack(tracker, _render(avatar, controls)))
    assert shift["yaw_shift"].max() > 0.01 and shift["pitch_shift"].max() > 0.01
    for net in avatar.mappers.expression.nets:  # expression no longer reaches the image
        torch.nn.init.zeros_(net[2].weight)
    shift = _pose_shift(avatar, tracker, controls, donors, _retrack(tracker, _render(avatar, controls)))
    assert shift["yaw_shift"].max() == 0 and shift["pitch_shift"].max() == 0


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
