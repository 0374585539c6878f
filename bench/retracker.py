"""The re-tracker as an instrument: how far its reading of the head moves with an image's blur alone, and so how
much of a render's control error is its blur. On a bench/prior.py fit, the held-out real frames (aligned, at the
avatar's resolution, as `pvp eval` reads them) are re-tracked plain, blurred (a Gaussian of σ px), and through the
demo's 512 px round trip (the served image scaled back); then the renders of their controls, and the real frames
blurred frame by frame to the sharpness of the render of that frame.

Per fit: for each σ, the blurred frames' sharpness over the plain ones' and the mean shift of the re-tracked yaw,
pitch and jaw; the renders' control errors (median |re-tracked − requested|, as `pvp eval`'s) beside the real
frames' plain and at the renders' sharpness — the part of the render's error its blur alone explains.

    python bench/retracker.py [--clips lp_d3 lp_d12] [--variant preset] [--work DIR]

Writes bench/results/retracker_<preset>.json (a rerun replaces its clips' rows of that variant).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import fitted_avatar_args, measure_fitted_clips, print_table  # noqa: E402
from pvp.evaluation.evaluate import RETRACKED_COLUMNS  # noqa: E402

SIGMAS = (0.5, 0.7, 1.0)
MATCHING_SIGMAS = np.round(np.arange(0.0, 1.51, 0.1), 1)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return images if sigma == 0 else np.stack([cv2.GaussianBlur(x, (0, 0), sigma) for x in images])


def control_errors(read: dict, requested: np.ndarray) -> dict:
    return {k: round(float(np.median(np.abs(read[k] - requested[:, c]))), 3) for k, c in RETRACKED_COLUMNS.items()}


def instrument_figures(avatar, track, training: np.ndarray, held_out: np.ndarray) -> dict:
    from pvp.demo.run import at_resolution, served
    from pvp.evaluation.evaluate import _render, _retrack, load_frames, sharpness
    from pvp.tracking.differentiable import DifferentiableTracker, aligned_roi

    tracker = DifferentiableTracker(avatar.face_model, roi=aligned_roi(track, training))  # as `pvp eval`'s
    frames = load_frames(track, held_out, avatar)
    real, plain_sharpness = frames.images, sharpness(frames.images)
    plain = _retrack(tracker, real)

    def shift(images: np.ndarray) -> dict:
        read = _retrack(tracker, images)
        return {k: round(float(np.mean(read[k] - plain[k])), 3) for k in RETRACKED_COLUMNS}

    by_sigma = [{"sigma": s, "sharpness_ratio": round(float(np.mean(sharpness(blurred(real, s)) / plain_sharpness)), 3),
                 **shift(blurred(real, s))} for s in SIGMAS]
    renders = _render(avatar, frames.controls)
    render_ratio = sharpness(renders) / plain_sharpness
    ladder = np.stack([sharpness(blurred(real, s)) / plain_sharpness for s in MATCHING_SIGMAS], 1)
    matched_sigma = MATCHING_SIGMAS[np.abs(ladder - render_ratio[:, None]).argmin(1)]
    matched = np.stack([blurred(real[i:i + 1], s)[0] for i, s in enumerate(matched_sigma)])
    round_trip = at_resolution(served(real), real.shape[1])
    return {"frames": int(len(held_out)), "by_sigma": by_sigma, "round_trip_512": shift(round_trip),
            "render_sharpness_ratio": round(float(render_ratio.mean()), 3),
            "matched_sigma_median": float(np.median(matched_sigma)),
            "render_err": control_errors(_retrack(tracker, renders), frames.controls),
            "real_err": control_errors(plain, frames.controls),
            "real_at_render_sharpness_err": control_errors(_retrack(tracker, matched), frames.controls)}


def main(argv=None):
    args = fitted_avatar_args(__doc__, "preset", argv)
    os.chdir(ROOT)
    rows = measure_fitted_clips("retracker", args, lambda avatar, track, parts: instrument_figures(
        avatar, track, parts["training"], parts["held_out"]))
    table = [{"clip": r["clip"], "variant": r["variant"], "render sharpness": r["render_sharpness_ratio"],
              **{f"{k} err: render / real / real at its sharpness": " / ".join(
                  str(r[part][k]) for part in ("render_err", "real_err", "real_at_render_sharpness_err"))
                 for k in RETRACKED_COLUMNS},
              **{f"σ {s['sigma']}: sharpness, yaw / pitch / jaw shift": f"{s['sharpness_ratio']}, " + " / ".join(
                  f"{s[k]:+.2f}" for k in RETRACKED_COLUMNS) for s in r["by_sigma"]}} for r in rows]
    print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
