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


def evaluate(avatar: Path, video: Path, frames: str, out: Path, bench: str, *options: str) -> dict:
    """`pvp eval` of ``avatar`` on ``frames`` of ``video`` (with ``options``), written to ``out``: its summary."""
    run_pvp(["eval", str(avatar), "--video", str(video), "--frames", frames, *options, "-o", str(out)], bench)
    return json.loads((out / "summary.json").read_text())


def rounded(values: dict, columns) -> dict:
    """Those of ``columns`` that ``values`` has, to three decimals."""
    return {c: round(values[c], 3) for c in columns if c in values}


def shared_stages(work: Path, preset, clip: str) -> Path:
    """Where bench/prior.py keeps a clip's track, aligned frames and pivots for the fits of ``preset`` (a Preset):
    one folder per crop rule, as a fit resumes from the track it finds."""
    return work / preset.name / clip / f"stages_{preset.crop_scale}"


def held_out_split(video: Path) -> tuple[str, str]:
    """The clip's first 80% of frames to train on, the last 20% held out, as `pvp` frame ranges."""
    import cv2

    n = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))
    cut = int(round(n * 0.8))
    return f"0:{cut}", f"{cut}:"


def fitted_avatar_args(doc: str, variant: str, argv=None, add_arguments=None) -> argparse.Namespace:
    """The arguments of a bench that measures bench/prior.py's fits: --preset, --clips, --variant, --work, --out,
    and those ``add_arguments`` (a function of the parser) adds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clips", nargs="+", default=["lp_d3", "lp_d12"])
    ap.add_argument("--variant", default=variant, help="the bench/prior.py fit to measure")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "prior")
    ap.add_argument("--out", type=Path)
    if add_arguments is not None:
        add_arguments(ap)
    return ap.parse_args(argv)


def kept_rows(out_json: Path, args: argparse.Namespace) -> list[dict]:
    """The rows of a results file that a rerun for ``args`` (fitted_avatar_args) keeps: all but its clips' rows of
    its variant."""
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    return [r for r in rows if not (r["clip"] in args.clips and r["variant"] == args.variant)]


def measure_fitted_clips(name: str, args: argparse.Namespace, figures_of) -> list[dict]:
    """For each clip of ``args`` (fitted_avatar_args), ``figures_of(avatar, track, parts)`` (fitted_clip's) on its
    bench/prior.py fit, as a row of bench/results/<name>_<preset>.json (or --out), written as each clip is done.
    Returns every row of the file."""
    from bench.prior import machine

    out_json = args.out or RESULTS / f"{name}_{args.preset}.json"
    rows = kept_rows(out_json, args)
    for clip in args.clips:
        _, avatar, track, parts = fitted_clip(args, clip)
        rows.append({"clip": clip, "variant": args.variant, "work": str(args.work), **figures_of(avatar, track, parts)})
        write_results(f"{name}_{args.preset}", machine(), rows, out_json)
    return rows


def fitted_clip(args: argparse.Namespace, clip: str):
    """The bench/prior.py fit of ``clip`` that ``args`` (fitted_avatar_args) names: its directory, the avatar,
    its track, and the valid track positions of the training and the held-out frames ('training', 'held_out')."""
    import numpy as np

    from pvp.avatar import Avatar
    from pvp.tracking.track import Track

    _, held_out = held_out_split(ROOT / "tests" / "data" / f"{clip}.mp4")
    avatar_dir = args.work / args.preset / clip / args.variant
    track = Track.load(avatar_dir / "work" / "track.safetensors")
    cut = int(held_out.rstrip(":"))  # a track position, as `pvp fit --train-frames` counts them
    position = np.arange(len(track))
    parts = {"training": np.flatnonzero(track.valid & (position < cut)),
             "held_out": np.flatnonzero(track.valid & (position >= cut))}
    return avatar_dir, Avatar.load(avatar_dir), track, parts


def device_description(device) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    from pvp.fit.training import cpu_bfloat16_units

    threads = torch.get_num_threads()
    return (f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''}"
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
