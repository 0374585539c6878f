"""The jaw and the expression sliders keyed alone, as an animator keys them: on a bench/prior.py fit, from the
median of the training frames' controls, the jaw's opening swept alone over its learned range, and each of the
first expression channels swept alone over its own; every render re-tracked with `pvp eval`'s tracker.

Per fit: the slope of the re-tracked opening over the requested one (the re-tracker reads real 64 px frames of the
shared clips at 0.76–0.84, so about that means the mouth opens as asked; a jaw the expression channels also carry
opens less when keyed alone), the opening the re-tracker reads at each end of the sweep, the head's yaw and pitch
travel while only the jaw moves, and the median and the most, over the expression channels, of the re-tracked
opening's travel while one of them moves alone (0: no expression channel opens the mouth).

    python bench/jaw_alone.py [--clips lp_d3 lp_d12] [--variant preset] [--work DIR] [--steps 9]

Writes bench/results/jaw_alone_<preset>.json (a rerun replaces its clips' rows of that variant).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import fitted_avatar_args, measure_fitted_clips, print_table  # noqa: E402

EXPRESSION_CHANNELS = 8


def sweep_figures(avatar, track, training: np.ndarray, steps: int) -> dict:
    from pvp.evaluation.evaluate import _render, _retrack, slider_sweeps
    from pvp.tracking.differentiable import DifferentiableTracker, aligned_roi
    from pvp_contract import controls

    tracker = DifferentiableTracker(avatar.face_model, roi=aligned_roi(track, training))
    schema = avatar.meta.schema
    names, sweeps = slider_sweeps(schema, np.median(track.controls(schema, training), 0), steps)
    jaw = names.index(schema["channels"][controls.JAW_OPEN]["name"])
    requested = sweeps[jaw, :, controls.JAW_OPEN]
    rt = _retrack(tracker, _render(avatar, sweeps[jaw]))
    expression = [names.index(c["name"]) for c in schema["channels"] if c["group"] == "expression"]
    travel = [np.ptp(_retrack(tracker, _render(avatar, sweeps[i]))["jaw"]) for i in expression[:EXPRESSION_CHANNELS]]
    return {"jaw_slope": round(float(np.polyfit(requested, rt["jaw"], 1)[0]), 3),
            "jaw_requested_deg": [round(float(requested[0]), 2), round(float(requested[-1]), 2)],
            "jaw_retracked_deg": [round(float(rt["jaw"][0]), 2), round(float(rt["jaw"][-1]), 2)],
            "yaw_travel_deg": round(float(np.ptp(rt["yaw"])), 2),
            "pitch_travel_deg": round(float(np.ptp(rt["pitch"])), 2),
            "expression_jaw_travel_deg": round(float(np.median(travel)), 2),
            "expression_jaw_travel_max_deg": round(float(np.max(travel)), 2)}


def main(argv=None):
    args = fitted_avatar_args(__doc__, "preset", argv, lambda ap: ap.add_argument("--steps", type=int, default=9))
    os.chdir(ROOT)
    rows = measure_fitted_clips("jaw_alone", args, lambda avatar, track, parts: sweep_figures(
        avatar, track, parts["training"], args.steps))
    print_table(rows, ["clip", "variant", "jaw_slope", "jaw_requested_deg", "jaw_retracked_deg", "yaw_travel_deg",
                       "pitch_travel_deg", "expression_jaw_travel_deg", "expression_jaw_travel_max_deg"])


if __name__ == "__main__":
    main()
