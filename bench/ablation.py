"""Mapper choices, measured: where the project departs from the authors' code (ken2576/pvp), which way is
better for a preset? One prior per clip (the preset's, first 80% of the frames to train), then the mapper
stage trained on it for the preset as it is ('base') and for each variant (one choice switched), each
avatar scored by `pvp eval` on the held-out last 20%.

    python bench/ablation.py [--preset tiny] [--clips lp_d3 lp_d12] [--variants base hull ...]
                             [--set mapper_steps=500 ...]

Writes bench/results/ablation_<preset>.json after every variant (a rerun skips the variants already there).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, evaluate, held_out_split, print_table, rounded, run_pvp, write_results  # noqa: E402

DATA = ROOT / "tests" / "data"
# variant -> (what it switches, `pvp fit` arguments): each choice where the CPU presets and the authors'
# code (the `paper` preset) can differ, set the other way than the CPU presets set it
AUTHORS = {
    "mlp": ["--set", "mapper_design.leaky_slope=0.01", "--set", "mapper_design.zero_init_output=false",
            "--set", "standardize_mapper_inputs=false"],
    "novel_pose": ["--set", "objective.novel_pose=0"],
    "objective": ["--set", "objective.perturb_jaw=false", "--set", "objective.consistency_mask=soft",
                  "--set", "objective.optimize_noise=true"],
}
VARIANTS = {
    "base": ("the preset as it is", []),
    "hull": ("the literal Eq. 6 hull instead of the authors' normalisation", ["--set", "mapper_design.hull=eq6"]),
    "mlp": ("raw radians in, LeakyReLU 0.01, default initialisation (the authors' MLPs)", AUTHORS["mlp"]),
    "pivots": ("nearest members plus the pose extremes instead of the authors' random members",
               ["--pivots", "kmeans-nearest"]),
    "novel_pose": ("no novel-pose term (the paper's terms only)", AUTHORS["novel_pose"]),
    "objective": ("expression-only perturbation, soft consistency mask, noise maps trained",
                  AUTHORS["objective"]),
    "authors": ("all of the above that the preset does not already do the authors' way",
                [a for v in AUTHORS.values() for a in v]),
}
STAGE_FILES = ("track.safetensors", "latents.safetensors", "generator.safetensors", "pivots.json")
COLUMNS = ("psnr", "ssim", "yaw_err", "pitch_err", "jaw_err", "expr_err", "yaw_shift", "pitch_shift")


def run(cmd: list[str]) -> None:
    run_pvp(cmd, "bench/ablation.py")


def prepare_variant(prior: Path, out: Path, args: list[str], preset: str, video: Path, train: str) -> None:
    """The prior fit's finished stages; with other pivots, their latents re-read from the prior's per-frame
    latents (a from-scratch prior has one for every training frame)."""
    (out / "work").mkdir(parents=True)
    for name in [*STAGE_FILES, *(p.name for p in (prior / "work").glob("frames_*.safetensors"))]:
        if name != "pivots.json" or "--pivots" not in args:
            shutil.copy2(prior / "work" / name, out / "work" / name)
    if "--pivots" not in args:
        return
    import torch
    from safetensors.torch import load_file, save_file

    from pvp.fit.pipeline import FitInputs, FitJob
    from pvp.fit.presets import PRESETS

    method = args[args.index("--pivots") + 1]
    job = FitJob(FitInputs(source=video, avatar=out, preset=PRESETS[preset], train_frames=train, pivot_method=method,
                           progress=False))
    track = job.track()
    frames = job.frames(track, PRESETS[preset].resolution)
    rows = job.training_rows(track, frames["frame_index"])
    pivots = job.pivots(track, frames["frame_index"], rows)
    latents = load_file(str(out / "work" / "latents.safetensors"))
    row_of = {int(r): k for k, r in enumerate(latents["train_rows"])}
    latents["pivot_w"] = latents["frame_w"][[row_of[int(p)] for p in pivots]].contiguous()
    latents["pivot_rows"] = torch.as_tensor(pivots)
    save_file(latents, str(out / "work" / "latents.safetensors"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", nargs="+", default=["lp_d3", "lp_d12"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "ablation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset override for every fit")
    ap.add_argument("--out", type=Path, help="results file (default bench/results/ablation_<preset>.json)")
    args = ap.parse_args(argv)

    common = [a for item in args.set for a in ("--set", item)]
    out_json = args.out or RESULTS / f"ablation_{args.preset}.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {(r["clip"], r["variant"]) for r in rows}
    for clip in args.clips:
        video = DATA / f"{clip}.mp4"
        train, held_out = held_out_split(video)
        prior = args.work / clip / "prior"
        for variant in args.variants:
            if (clip, variant) in done:
                continue
            description, fit_args = VARIANTS[variant]
            out = args.work / clip / variant
            if not (prior / "work" / "latents.safetensors").is_file():  # the prior stage, the mappers barely
                shutil.rmtree(prior, ignore_errors=True)
                run(["fit", str(video), "-o", str(prior), "--preset", args.preset, "--train-frames", train, *common,
                     "--set", "mapper_steps=1"])
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            prepare_variant(prior, out, fit_args, args.preset, video, train)
            run(["fit", str(video), "-o", str(out), "--preset", args.preset, "--train-frames", train, "--resume",
                 *common, *fit_args])
            seconds = time.perf_counter() - t0
            summary = evaluate(out, video, held_out, out / "eval", "bench/ablation.py")
            scores = rounded(summary["methods"]["avatar"], COLUMNS)
            rows.append({"clip": clip, "variant": variant, "changes": description, "held_out": held_out,
                         "mapper_seconds": round(seconds, 1), **scores})
            write_results(f"ablation_{args.preset}", "CPU", rows, out_json)
            print(f"{clip} {variant}: " + ", ".join(f"{c} {rows[-1].get(c)}" for c in COLUMNS), flush=True)
    print_table(rows, ["clip", "variant", *COLUMNS])


if __name__ == "__main__":
    main()
