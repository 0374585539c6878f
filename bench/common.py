"""Shared helpers of the bench scripts: timing, the machine's description, JSON results."""
from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_description(device) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
