"""Fit-stage times: a shortened fit (a fraction of every training stage's optimiser steps), timed per
stage by the fit itself (metrics.json), and each training stage's step loop extrapolated linearly to the
preset's full step counts (its setup counted once). The paper's run: PTI 3 h (200 pivots, RTX 3080) + mappers
4 h (A10); target <= 30 min.

    python bench/fit.py [--video V] [--preset tiny] [--fraction 0.05] [--train-frames 0:150] [--set KEY=VALUE ...]
    python bench/fit.py --preset paper --prior ffhq.pkl --vgg vgg16-397923af.pth --arcface model_ir_se50.pth \\
                        --device cuda
    python bench/fit.py --preset paper --random-weights DIR --device cuda

--random-weights DIR: the official files written with random values at their full size (StyleGAN2
config-f 1024 in rosinality's layout, torchvision's VGG16, IR-SE50), for timing where the real ones are
not at hand. VIDEO may be a track file (`pvp track`): no tracker needed where the fit runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import device_description, print_table, write_results  # noqa: E402
from pvp.fit.presets import PRESETS, apply_settings  # noqa: E402

DATA = ROOT / "tests" / "data"
# the fields that set each stage's length, shortened together by --fraction
SHORTENED = {"prior": ("prior_steps",), "inversion": ("invert_w_steps", "invert_wplus_steps"),
             "tuning": ("pti_steps_per_pivot",), "mappers": ("mapper_steps",)}


def random_official_weights(folder: Path, wanted: list[str]) -> dict[str, Path]:
    """The paper preset's files (of prior, vgg, arcface: the ``wanted``) in their official layouts, random
    values, full size; each written once."""
    import torch

    from pvp.models.generator import default_channels
    from tests.official_layouts import random_generator, write_rosinality_pt

    folder.mkdir(parents=True, exist_ok=True)
    files = {"prior": folder / "stylegan2-ffhq-config-f.pt", "vgg": folder / "vgg16-397923af.pth",
             "arcface": folder / "model_ir_se50.pth"}
    files = {k: v for k, v in files.items() if k in wanted}
    if "prior" in files and not files["prior"].is_file():
        G = random_generator(resolution=1024, w_dim=512, channels=default_channels(1024))
        write_rosinality_pt(G, files["prior"])
    if "vgg" in files and not files["vgg"].is_file():
        import torchvision

        torch.save(torchvision.models.vgg16().state_dict(), files["vgg"])
    if "arcface" in files and not files["arcface"].is_file():
        from pvp.models.arcface import ArcFace

        torch.save(ArcFace().state_dict(), files["arcface"])
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DATA / "lp_d12.mp4")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--fraction", type=float, default=0.05, help="share of the preset's training steps to run")
    ap.add_argument("--train-frames", default="0:150")
    ap.add_argument("--prior", type=Path)
    ap.add_argument("--vgg", type=Path)
    ap.add_argument("--arcface", type=Path)
    ap.add_argument("--random-weights", type=Path, metavar="DIR")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a preset override (`pvp fit --set`), applied before the shortening")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    missing = [k for k in ("prior", "vgg", "arcface") if getattr(args, k) is None]
    files = random_official_weights(args.random_weights, missing) if args.random_weights else {}
    prior, vgg, arcface = (getattr(args, k) or files.get(k) for k in ("prior", "vgg", "arcface"))
    try:
        preset = apply_settings(PRESETS[args.preset], args.set)
    except ValueError as e:
        sys.exit(f"bench/fit.py: --set {e}")
    pretrained = prior is not None
    full = preset.optimiser_steps(pretrained)
    fields = [f for stage in full for f in SHORTENED[stage]]
    short_preset = preset.with_overrides(**{f: max(1, round(getattr(preset, f) * args.fraction)) for f in fields})
    short = short_preset.optimiser_steps(pretrained)
    sets = [a for item in [*args.set, *(f"{f}={getattr(short_preset, f)}" for f in fields)] for a in ("--set", item)]
    extra = [a for flag, value in (("--prior", prior), ("--vgg", vgg), ("--arcface", arcface)) if value
             for a in (flag, str(value))]
    with tempfile.TemporaryDirectory(prefix="pvp_bench_fit_") as tmp:
        out = Path(tmp) / "avatar"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pvp.cli", "fit", str(args.video), "-o", str(out), "--preset",
                            args.preset, "--train-frames", args.train_frames, "--device", args.device, *extra, *sets],
                           cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"bench/fit.py: the fit failed:\n{r.stderr[-3000:]}")
        metrics = json.loads((out / "work" / "metrics.json").read_text())
    stages = dict(metrics["stage_seconds"])
    loops = {"mappers": metrics["mapper_training"]}  # each training stage's step loop: steps and seconds
    if pretrained:  # the prior stage is inversion, then tuning
        stages = {k: stages[k] for k in ("track", "frames", "pivots")} | {
            "inversion": metrics["inversion_seconds"], "tuning": stages["prior"] - metrics["inversion_seconds"],
            "mappers": stages["mappers"], "bundle": stages["bundle"]}
        loops["tuning"] = metrics["tuning"]
        loops["inversion"] = {"steps": short["inversion"], "seconds": metrics["inversion_seconds"]}
    elif "prior_training" in metrics:
        loops["prior"] = metrics["prior_training"]
    rows = []
    for stage, seconds in stages.items():
        row = {"stage": stage, "measured_s": round(seconds, 1), "full_run_s": round(seconds, 1)}
        if stage in loops:
            steps, loop_s = int(loops[stage]["steps"]), loops[stage]["seconds"]
            row.update(steps_run=steps, ms_per_step=round(1000 * loop_s / steps, 1), steps_full=full[stage],
                       full_run_s=round(seconds - loop_s + loop_s * full[stage] / steps, 1))
        rows.append(row)
    total = sum(r["full_run_s"] for r in rows)
    rows.append({"stage": "total", "measured_s": round(sum(stages.values()), 1), "full_run_s": round(total, 1)})
    print_table(rows, ["stage", "measured_s", "steps_run", "ms_per_step", "steps_full", "full_run_s"])
    print(f"wall time of the shortened fit: {wall:.1f} s; extrapolated full {args.preset} fit: {total / 60:.1f} min "
          "(paper: 3 h PTI + 4 h mappers; target <= 30 min)")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = f"fit_{args.preset}" + ("_set" if args.set else "")  # the preset's own file holds the preset as it is
    print(write_results(name, f"{device_description(device)}; {args.video.name} frames "
                        f"{args.train_frames}" + "".join(f"; --set {item}" for item in args.set), rows, args.out))


if __name__ == "__main__":
    main()
