"""`pvp demo`, shortened (a 60-frame synthetic clip, few training steps): every step and output."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "pvp_server.cli", "demo", "--out", str(out), "--frames", "60",
                        "--set", "prior_steps=200", "--set", "mapper_steps=20"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pvp demo finished" in r.stdout and "total" in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["face_found"] >= 0.9  # the embedded tracker finds the synthetic subject
    truth = json.loads((out / "synthetic" / "truth.json").read_text())["frames"]
    assert len(truth) == 60 and np.ptp([f["yaw"] for f in truth]) > 20  # a performance with known motion
    held = 60 - int(60 * 0.8)
    movie = cv2.VideoCapture(str(out / "out.mp4"))
    assert int(movie.get(cv2.CAP_PROP_FRAME_COUNT)) == held
    ok, first = movie.read()
    assert ok and first.std() > 5  # an image, not a blank
    movie.release()
    assert len(list((out / "frames").glob("frame_*.png"))) == held
    assert (out / "scene.blend").stat().st_size > 100_000
    page = (out / "eval" / "report.html").read_text()
    assert "known ground truth" in page and "nearest pivot" in page
    gt = summary["ground_truth"]
    assert gt["frames"] == held
    # the keys Blender got come from tracking the synthetic clip: they follow the known yaw
    assert gt["yaw"]["keyed_median_abs_err_deg"] < 8.0
