"""The from-scratch prior alone, without the mappers (issue 20): a quicker look at where its blur comes from
than bench/prior.py's whole fits. Trained on a clip's first 80% with every 4th of those frames held back;
then its renders of the frames it learned (their own latents) and of the held-back frames (their two
neighbours' latents blended at the frame's time: the prior between its latents, with no mapper in the way)
against the real frames — PSNR, SSIM and sharpness (variance of the Laplacian, render / real).

    python bench/prior_probe.py --clip lp_d12 [--preset tiny] [--set KEY=VALUE ...] [--name NAME]

Needs the clip's track from bench/prior.py (its shared stages); appends a row per (clip, name) to
bench/results/prior_probe_<preset>.json, replacing one of the same name.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    RESULTS,
    device_description,
    held_out_split,
    print_table,
    shared_stages,
    write_results,
)
from bench.prior import DATA  # noqa: E402
from pvp.evaluation.evaluate import sharpness  # noqa: E402
from pvp.fit.data import build_frames, parse_range, to_tensor  # noqa: E402
from pvp.fit.presets import PRESETS, apply_settings  # noqa: E402
from pvp.fit.scratch_prior import standardized_controls, train_scratch_prior  # noqa: E402
from pvp.models.generator import to_uint8  # noqa: E402
from pvp.models.losses import psnr, ssim  # noqa: E402
from pvp.tracking.track import Track  # noqa: E402

HELD_BACK_EVERY = 4


def neighbour_blend(kept: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each held-back frame number (each between two kept ones), the positions in ``kept`` (sorted frame
    numbers) of the kept frames just before and after it and the blend weight of the later one at its time."""
    after = np.searchsorted(kept, held)
    before = after - 1
    return before, after, (held - kept[before]) / (kept[after] - kept[before])


def scores(renders: torch.Tensor, real: np.ndarray) -> dict:
    target = to_tensor(real)
    return {"psnr": round(float(psnr(renders, target).mean()), 2),
            "ssim": round(float(ssim(renders, target).mean()), 3),
            "sharpness": round(float(sharpness(to_uint8(renders).numpy()).mean() / sharpness(real).mean()), 3)}


def commit() -> str:
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return git.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", help="the row's name (default: the --set items)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "prior")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the named run's prior from its checkpoint")
    args = ap.parse_args()
    try:
        preset = apply_settings(PRESETS[args.preset], args.set)
    except ValueError as e:
        sys.exit(f"bench/prior_probe.py: --set {e}")
    stages = shared_stages(args.work, preset, args.clip)
    if not (stages / "track.safetensors").is_file():
        sys.exit(f"bench/prior_probe.py: {stages / 'track.safetensors'} is missing: run bench/prior.py "
                 f"--prepare --clips {args.clip} first")
    track = Track.load(stages / "track.safetensors")
    data = build_frames(track, preset.resolution, stages / f"frames_{preset.resolution}.safetensors", progress=False)
    start, stop = parse_range(held_out_split(ROOT / DATA / f"{args.clip}.mp4")[0], len(track))
    wanted = set(track.frame_index[start:stop].tolist())
    train = [r for r, i in enumerate(data["frame_index"]) if int(i) in wanted]
    held = np.array(train[HELD_BACK_EVERY // 2:-1:HELD_BACK_EVERY])  # never the last: each lies between two kept
    kept = np.array(sorted(set(train) - set(held.tolist())))
    pos = {int(i): k for k, i in enumerate(track.frame_index)}
    tr = np.array([pos[int(data["frame_index"][r])] for r in kept])
    controls = standardized_controls(track.yaw_pitch_roll[tr, :2], track.jaw_pose[tr], track.expression[tr])
    frames = to_tensor(data["images"])
    name = args.name or " ".join(args.set) or "preset"
    checkpoint = args.work / args.preset / args.clip / "probe" / name.replace(" ", "_") / "prior.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    G, latents, _ = train_scratch_prior(frames[kept], controls, preset, checkpoint, "cpu", resume=args.resume,
                                        seed=args.seed, frame_numbers=data["frame_index"][kept])
    seconds = time.perf_counter() - t0
    before, after, at = neighbour_blend(data["frame_index"][kept], data["frame_index"][held])
    with torch.no_grad():
        own = G.synthesis(latents(torch.arange(len(kept))), noise_mode="const")
        w = torch.lerp(latents(torch.from_numpy(before)), latents(torch.from_numpy(after)),
                       torch.from_numpy(at).float().view(-1, 1, 1))
        between = G.synthesis(w, noise_mode="const")
    row = {"clip": args.clip, "name": name, "settings": args.set, "seed": args.seed, "commit": commit(),
           "prior_s": round(seconds),
           **{f"learned_{k}": v for k, v in scores(own, data["images"][kept]).items()},
           **{f"between_{k}": v for k, v in scores(between, data["images"][held]).items()},
           "frames_learned": len(kept), "frames_between": len(held)}
    out = RESULTS / f"prior_probe_{args.preset}.json"
    rows = [r for r in (json.loads(out.read_text())["rows"] if out.is_file() else [])
            if (r["clip"], r["name"]) != (args.clip, name)]
    rows.append(row)
    write_results(f"prior_probe_{args.preset}", device_description("cpu"), rows, out)
    print_table(rows, list(row)[:2] + [k for k in row if k.startswith(("learned", "between"))] + ["prior_s"])


if __name__ == "__main__":
    main()
