"""`paper` against `paper-exact` at a reduced shape, on CPU: the same 200 pivots, batches and step ratios
as the presets, a small generator (fewer pixels), every step count multiplied by --scale for both.
Each preset fits the clip's first 80% (`pvp fit` with the prior given as the pretrained generator), then
`pvp eval` scores the avatar on its training frames and on the held-out last 20%. Prints and writes the
side by side: optimiser steps, the stages' final losses, PSNR/SSIM, control errors and wall times.

    python bench/schedules.py --prior PRIOR.safetensors [--video tests/data/lp_d3.mp4] [--scale 0.1]
           [--parallel] [--set KEY=VALUE ...]

PRIOR: a generator at the reduced resolution, e.g. the from-scratch prior of another clip
(`pvp fit OTHER.mp4 -o P --preset tiny --set mapper_steps=1`: P/work/generator.safetensors), so that
inversion and tuning have a stranger to adapt, as the FFHQ prior has."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import evaluate, held_out_split, print_table, rounded, write_results  # noqa: E402
from pvp.fit.presets import PRESETS, apply_settings  # noqa: E402

SCALED = ("invert_w_steps", "invert_wplus_steps", "pti_steps_per_pivot", "mapper_steps")
EVAL_COLUMNS = ("psnr", "ssim", "psnr_worst10", "yaw_err", "pitch_err", "expr_err")


def scaled(name: str, scale: float, overrides: list[str]):
    """The preset with its step counts scaled, then the overrides (which may set a step count themselves)."""
    preset = PRESETS[name]
    items = [*(f"{f}={max(1, round(getattr(preset, f) * scale))}" for f in SCALED), *overrides]
    return apply_settings(preset, items), [a for item in items for a in ("--set", item)]


def scores(avatar: Path, video: Path, frames: str, name: str) -> dict:
    summary = evaluate(avatar, video, frames, avatar / name, "bench/schedules.py")
    return rounded(summary["methods"]["avatar"], EVAL_COLUMNS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", type=Path, required=True)
    ap.add_argument("--video", type=Path, default=ROOT / "tests" / "data" / "lp_d3.mp4")
    ap.add_argument("--presets", nargs="+", default=["paper-exact", "paper"])
    ap.add_argument("--scale", type=float, default=0.1, help="every step count of both presets times this")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for both")
    ap.add_argument("--parallel", action="store_true", help="the fits side by side, one thread each")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "schedules")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from pvp.checkpoints import load_generator

    resolution = load_generator(args.prior, "cpu").cfg.resolution
    # the reduced shape: the prior's pixels, MS-SSIM for LPIPS-VGG and no ArcFace (no weights here)
    reduced = [f"resolution={resolution}", "perceptual=msssim", "needs_prior=false", *args.set]
    train, held_out = held_out_split(args.video)
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.parallel else dict(os.environ)
    jobs = {}
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.presets:
        try:
            preset, sets = scaled(name, args.scale, reduced)
        except ValueError as e:
            sys.exit(f"bench/schedules.py: --set {e}")
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "pvp.cli", "fit", str(args.video), "-o", str(out), "--preset", name,
               "--prior", str(args.prior), "--train-frames", train, "--device", "cpu", *sets]
        with open(args.work / f"{name}.log", "w") as log:
            jobs[name] = (preset, out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        if not args.parallel:
            jobs[name][2].wait()
    rows = []
    for name, (preset, out, proc) in jobs.items():
        if proc.wait() != 0:
            sys.exit(f"bench/schedules.py: the {name} fit failed; see {args.work / (name + '.log')}")
        metrics = json.loads((out / "work" / "metrics.json").read_text())
        planned = preset.optimiser_steps(pretrained=True)
        taken = {**planned, "tuning": int(metrics["tuning"]["steps"]),
                 "mappers": int(metrics["mapper_training"]["steps"])}
        stages = metrics["stage_seconds"]
        row = {"preset": name, "scale": args.scale, "steps_inversion": taken["inversion"],
               "steps_tuning": taken["tuning"], "steps_mappers": taken["mappers"], "steps_total": sum(taken.values()),
               "pivot_psnr": round(metrics["pivot_psnr_mean"], 2),
               "pivot_perceptual": round(metrics["pivot_perceptual_mean"], 4),
               "mapper_loss_last": round(metrics["mapper_training"]["loss"], 4),
               **{f"train_{k}": v for k, v in scores(out, args.video, train, "eval_train").items()},
               **{f"held_{k}": v for k, v in scores(out, args.video, held_out, "eval_held_out").items()},
               "prior_s": round(stages.get("prior", 0), 1), "mappers_s": round(stages.get("mappers", 0), 1),
               "fit_s": round(sum(stages.values()), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, list(rows[0]))
    print(write_results("schedules", f"CPU; {args.video.name} train {train}, held out {held_out}; "
                        f"prior {args.prior.name} at {resolution}px; steps x{args.scale}", rows, args.out))


if __name__ == "__main__":
    main()
