"""`pvp demo` at a training schedule: its wall time, its steps' and the fit's stages' times, and its figures (the
fit's training and held-out PSNR, `pvp eval`'s methods on the held-out frames, the ground truth's control errors),
as one row of bench/results/demo_schedule.json (a rerun replaces its label's row).

    python bench/demo_schedule.py LABEL [--out DIR] [--full] [--set KEY=VALUE ...]
    python bench/demo_schedule.py LABEL --measured DIR --commit C [--wall-s S]   # a demo run already: its figures
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, print_table, write_results  # noqa: E402
from bench.prior import machine  # noqa: E402

COLUMNS = ["label", "prior_steps", "mapper_steps", "wall_s", "fit_s", "demo_s", "train_psnr", "heldout_psnr",
           "best_baseline_psnr"]


def demo_row(label: str, folder: Path) -> dict:
    demo = json.loads((folder / "demo.json").read_text())
    methods = json.loads((folder / "eval" / "summary.json").read_text())["methods"]
    preset = json.loads((folder / "avatar" / "work" / "settings.json").read_text())["preset"]
    metrics = json.loads((folder / "avatar" / "avatar.json").read_text())["metrics"]
    baselines = [m for name, m in methods.items() if name.startswith("nearest_")]
    return {"label": label, "prior_steps": preset["prior_steps"], "mapper_steps": preset["mapper_steps"],
            "fit_s": next(v for k, v in demo["seconds"].items() if k.startswith("fit")),
            "demo_s": round(sum(demo["seconds"].values()), 1), "seconds": demo["seconds"],
            "stage_seconds": metrics["stage_seconds"],
            "render_dtype": [metrics["prior_render_dtype"], metrics["mapper_render_dtype"]],
            "pivot_psnr_mean": round(metrics["pivot_psnr_mean"], 2),
            **{k: round(metrics[k], 2) for k in ("train_psnr", "heldout_psnr")},
            "best_baseline_psnr": round(max(m["psnr"] for m in baselines), 2),
            **{name: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)} for name, m in methods.items()},
            "ground_truth": demo["ground_truth"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("label")
    ap.add_argument("--out", type=Path, help="the demo's folder (default bench/work/demo_schedule/LABEL)")
    ap.add_argument("--measured", type=Path, help="a demo's folder: its figures, nothing run")
    ap.add_argument("--commit", help="the commit a --measured demo ran (default HEAD)")
    ap.add_argument("--wall-s", type=float, help="a --measured demo's wall time, timed where it ran")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--results", type=Path, default=RESULTS / "demo_schedule.json")
    args = ap.parse_args(argv)
    wall, folder = args.wall_s, args.measured
    if folder is None:
        folder = args.out or ROOT / "bench" / "work" / "demo_schedule" / args.label.replace(" ", "_")
        cmd = [sys.executable, "-m", "pvp.cli", "demo", "--out", str(folder), *(["--full"] if args.full else []),
               *(a for item in args.set for a in ("--set", item))]
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            sys.exit(f"demo_schedule: `{' '.join(cmd)}` failed")
        wall = round(time.perf_counter() - start, 1)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    row = {**demo_row(args.label, folder), "wall_s": wall, "commit": commit, "machine": machine()}
    rows = [r for r in (json.loads(args.results.read_text())["rows"] if args.results.is_file() else [])
            if r["label"] != args.label]
    rows.append(row)
    write_results("demo_schedule", row["machine"], rows, args.results)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
