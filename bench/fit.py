"""Fit-stage times: a shortened fit (a fraction of the preset's training steps), timed per stage by the
fit itself (metrics.json: stage_seconds), and the training stages extrapolated linearly to the preset's
full step counts. The paper's run: PTI 3 h (200 pivots, RTX 3080) + mappers 4 h (A10); target <= 30 min.

    python bench/fit.py [--video V] [--preset tiny] [--fraction 0.05] [--train-frames 0:150]
    python bench/fit.py --preset paper --prior ffhq.pkl --vgg vgg16-397923af.pth --device cuda
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
from bench.common import print_table, write_results  # noqa: E402
from pvp.fit.presets import PRESETS  # noqa: E402

DATA = ROOT / "tests" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DATA / "lp_d12.mp4")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--fraction", type=float, default=0.05, help="share of the preset's training steps to run")
    ap.add_argument("--train-frames", default="0:150")
    ap.add_argument("--prior", type=Path)
    ap.add_argument("--vgg", type=Path)
    ap.add_argument("--arcface", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    scratch = args.prior is None
    steps = {"prior": preset.prior_steps if scratch else preset.pti_steps_per_pivot, "mappers": preset.mapper_steps}
    short = {k: max(1, int(round(v * args.fraction))) for k, v in steps.items()}
    sets = ["--set", f"mapper_steps={short['mappers']}", "--set",
            (f"prior_steps={short['prior']}" if scratch else f"pti_steps_per_pivot={short['prior']}")]
    extra = [a for flag, value in (("--prior", args.prior), ("--vgg", args.vgg), ("--arcface", args.arcface))
             if value for a in (flag, str(value))]
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
    stages = metrics["stage_seconds"]
    full = dict(stages)
    for stage in ("prior", "mappers"):
        full[stage] = stages[stage] * steps[stage] / short[stage]
    rows = [{"stage": k, "measured_s": round(v, 1), "steps_run": short.get(k, ""), "steps_full": steps.get(k, ""),
             "full_run_s": round(full[k], 1)} for k, v in stages.items()]
    rows.append({"stage": "total", "measured_s": round(sum(stages.values()), 1),
                 "full_run_s": round(sum(full.values()), 1)})
    print_table(rows, ["stage", "measured_s", "steps_run", "steps_full", "full_run_s"])
    print(f"wall time of the shortened fit: {wall:.1f} s; extrapolated full {args.preset} fit: "
          f"{sum(full.values()) / 60:.1f} min (paper: 3 h PTI + 4 h mappers; target <= 30 min)")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = f"fit_{args.preset}"
    print(write_results(name, f"{device}; {args.video.name} frames {args.train_frames}", rows, args.out))


if __name__ == "__main__":
    main()
