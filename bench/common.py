"""Shared helpers of the bench scripts: timing, the machine's description, JSON results."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run_pvp(cmd: list[str], bench: str) -> None:
    """`pvp CMD...`; a failure ends the bench with pvp's own error."""
    r = subprocess.run([sys.executable, "-m", "pvp.cli", *cmd], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{bench}: pvp {cmd[0]} failed:\n{r.stderr[-3000:]}")


def held_out_split(video: Path) -> tuple[str, str]:
    """The clip's first 80% of frames to train on, the last 20% held out, as `pvp` frame ranges."""
    import cv2

    n = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))
    cut = int(round(n * 0.8))
    return f"0:{cut}", f"{cut}:"


def fitted_avatar_args(doc: str, variant: str, argv=None) -> argparse.Namespace:
    """The arguments of a bench that measures bench/prior.py's fits: --preset, --clips, --variant, --work, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", nargs="+", default=["lp_d3", "lp_d12"])
    ap.add_argument("--variant", default=variant, help="the bench/prior.py fit to measure")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "prior")
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def device_description(device) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    from pvp.fit.training import cpu_bfloat16_units

    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
            + "".join(f", {name}" for name in cpu_bfloat16_units()))


def median_time(fn, warmup: int, repeat: int, sync=lambda: None) -> float:
    """Median wall time of fn() in seconds, after warm-up calls (sync() waits for queued device work)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, device: str, rows: list[dict], out: Path | None = None) -> Path:
    from pvp_contract.atomic import write_text

    out = out or RESULTS / f"{name}.json"
    payload = {"bench": name, "device": device, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "rows": rows}
    write_text(out, json.dumps(payload, indent=1) + "\n")
    return out


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
