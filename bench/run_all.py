"""Every benchmark in one run — generator, server round trip, Blender image updates, tracking, fit stages —
each writing bench/results/NAME.json, then their tables summed up in bench/RESULTS.md (between the
run_all markers; the hand-written notes around them stay).

    python bench/run_all.py              # CPU: quick settings (about 5 minutes on 2 cores)
    python bench/run_all.py --device cuda --full
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS  # noqa: E402
from pvp_contract.atomic import write_text  # noqa: E402

BEGIN, END = "<!-- run_all: begin -->", "<!-- run_all: end -->"


def plan(device: str, full: bool) -> list[tuple[str, list[str]]]:
    gen = ["--device", device] + ([] if full else ["--resolutions", "256", "1024", "--repeat", "2",
                                                   "--dtypes", "float32", "bfloat16"])
    if device.startswith("cuda"):
        gen = ["--device", device, "--resolutions", "256", "512", "1024", "--dtypes", "float32", "float16"]
    fit = ["--device", device, "--fraction", "0.05" if full else "0.02"]
    return [("generator", gen), ("server", []), ("blender", []),
            ("track", []), ("fit", fit)]


def markdown(result: dict) -> str:
    rows = result["rows"]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"### {result['bench']} — {result['device']}, {result['measured_at']}", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def update_results_md(names: list[str], seconds: dict[str, float]) -> Path:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    parts = []
    for name in names:
        file = RESULTS / f"{name}.json"
        if file.is_file():
            parts.append(markdown(json.loads(file.read_text())))
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    block = f"{BEGIN}\n## Latest `bench/run_all.py`\n\nScript times: {timing}.\n\n" + "\n\n".join(parts) + f"\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="the scripts' full settings (slow on CPU)")
    ap.add_argument("--only", nargs="+", help="a subset: generator server blender track fit")
    args = ap.parse_args(argv)
    seconds, names, failed = {}, [], []
    for script, script_args in plan(args.device, args.full):
        if args.only and script not in args.only:
            continue
        print(f"== bench/{script}.py {' '.join(script_args)}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *script_args], cwd=ROOT,
                           capture_output=True, text=True)
        seconds[script] = time.perf_counter() - t0
        out = "\n".join(line for line in r.stdout.splitlines() if not line.startswith(("Fra:", "Info:", "STATUS")))
        print(out, flush=True)
        if r.returncode != 0:
            failed.append(script)
            print(f"bench/{script}.py failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        names.append("fit_tiny" if script == "fit" else script)
    print(update_results_md(names, seconds))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
