"""How much of a held-out frame's error is framing (issue 20): the FFHQ crop is set by the eyes and the mouth
corners, so a mouth opened wider than in any training frame makes the crop larger and the face in it smaller
and lower — a placement no render of the learned range (the renderer clamps the jaw) and no training frame
has. Per clip, for a fitted avatar (bench/prior.py's fits):

- the crop's side over the interocular distance, training frames against held-out ones, and how often the
  mouth rather than the eyes set it (1.8 x eye-to-mouth > 2 x eye-to-eye, the FFHQ recipe);
- each method's PSNR on the held-out frames as `pvp eval` measures it, and registered: after the best
  scale and shift of the render onto the real frame (a grid search per frame) — what remains once the
  placement is taken out. Within the learned ranges and beyond them (clamped) apart.

    python bench/framing.py [--clips lp_d3 lp_d12] [--variant preset_bf16_6000]

Writes bench/results/framing_<preset>.json.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    device_description,
    fitted_avatar_args,
    held_out_split,
    print_table,
    write_results,
)

SCALES = np.arange(0.80, 1.081, 0.02)  # render magnified by this about the crop's centre
SHIFTS = np.arange(-4, 5) / 64  # of the crop's side


def crop_scale(track) -> tuple[np.ndarray, np.ndarray]:
    """Per track row: the crop's side over the interocular distance, and whether the mouth set the crop's size."""
    from pvp.tracking.align import EYE_SPAN, MOUTH_SPAN, ffhq_anchors

    _, eye_to_eye, eye_to_mouth = (np.linalg.norm(v, axis=-1) for v in ffhq_anchors(track.landmarks_2d))
    side = np.linalg.norm(track.align_quad[:, 3] - track.align_quad[:, 0], axis=1)
    return side / eye_to_eye, MOUTH_SPAN * eye_to_mouth > EYE_SPAN * eye_to_eye


def registered_psnr(render: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """The best PSNR of the render [R, R, 3] uint8 against the real frame over SCALES x SHIFTS x SHIFTS, and
    the scale that gave it."""
    import cv2

    res = render.shape[0]
    target = real.astype(np.float32) / 255
    best, best_scale = -np.inf, 1.0
    for s in SCALES:
        for dx in SHIFTS * res:
            for dy in SHIFTS * res:
                warp = np.array([[s, 0, (1 - s) * res / 2 + dx], [0, s, (1 - s) * res / 2 + dy]], np.float32)
                moved = cv2.warpAffine(render, warp, (res, res), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REFLECT).astype(np.float32) / 255
                value = -10 * np.log10(np.mean((moved - target) ** 2) + 1e-12)
                if value > best:
                    best, best_scale = value, s
    return float(best), float(best_scale)


def main(argv=None):
    from pvp.evaluation.evaluate import METHODS, evaluate
    from pvp.tracking.track import Track

    args = fitted_avatar_args(__doc__, "preset_bf16_6000", argv)

    os.chdir(ROOT)  # the fits' tracks name their videos from here: evaluate() then reuses them
    rows = []
    for clip in args.clips:
        video = Path("tests") / "data" / f"{clip}.mp4"
        train, held_out = held_out_split(video)
        avatar_dir = args.work / args.preset / clip / args.variant
        track = Track.load(avatar_dir / "work" / "track.safetensors")
        ratio, by_mouth = crop_scale(track)
        cut = int(held_out.rstrip(":"))
        parts = {"train": track.valid & (track.frame_index < cut), "held_out": track.valid & (track.frame_index >= cut)}
        crops = {**{f"{p}_crop_over_eyes": float(np.median(ratio[sel])) for p, sel in parts.items()},
                 "held_out_crop_over_eyes_max": float(ratio[parts["held_out"]].max()),
                 **{f"{p}_crops_set_by_mouth": float(by_mouth[sel].mean()) for p, sel in parts.items()}}
        result = evaluate(avatar_dir, video, held_out, progress=False)
        whole, plain, beyond = result.summary(), result.summary_by_range(), result.beyond_range
        for method in METHODS:
            if method not in result.renders:
                continue
            registered, scale = np.array([registered_psnr(r, g) for r, g in zip(result.renders[method],
                                                                                result.eval_set.images)]).T
            row = {"clip": clip, "variant": args.variant, "held_out": held_out, "method": method,
                   "psnr": round(whole[method]["psnr"], 3),
                   "psnr_registered": round(float(registered.mean()), 3)}
            for part, sel in (("within", ~beyond), ("beyond", beyond)):
                if sel.any():
                    row[f"frames_{part}"] = plain[part]["frames"]
                    row[f"psnr_{part}"] = round(plain[part]["methods"][method]["psnr"], 3)
                    row[f"psnr_registered_{part}"] = round(float(registered[sel].mean()), 3)
                    row[f"registered_scale_{part}"] = round(float(np.median(scale[sel])), 3)
            rows.append({**row, **(crops if method == "avatar" else {})})
            print(clip, method, row, flush=True)
        write_results(f"framing_{args.preset}", device_description("cpu"), rows, args.out)
    print_table(rows, ["clip", "method", "psnr", "psnr_registered", "psnr_within", "psnr_registered_within",
                       "psnr_beyond", "psnr_registered_beyond", "held_out_crop_over_eyes"])


if __name__ == "__main__":
    main()
