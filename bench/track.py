"""Tracking speed: frames per second of `pvp track` (decode + face mesh + pose/expression + crop quads)
on the shared clips, CPU. Target: >= 50 frames/s for 512x512 video on the 2-core machine.

    python bench/track.py [--clips tests/data/lp_d3.mp4 ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import device_description, print_table, write_results  # noqa: E402
from pvp.tracking.tracker import track_video  # noqa: E402

DATA = ROOT / "tests" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=Path, nargs="+", default=[DATA / "lp_d3.mp4", DATA / "lp_d12.mp4"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for clip in args.clips:
        t0 = time.perf_counter()
        track = track_video(clip, progress=False)
        dt = time.perf_counter() - t0
        w, h = track.image_size
        rows.append({"clip": clip.name, "size": f"{w}x{h}", "frames": len(track), "seconds": round(dt, 2),
                     "frames_per_s": round(len(track) / dt, 1), "face_found": f"{track.valid.mean():.1%}"})
    desc = device_description("cpu")
    print(f"pvp track (mediapipe backend) on {desc}")
    print_table(rows, ["clip", "size", "frames", "seconds", "frames_per_s", "face_found"])
    print(f"written to {write_results('track', desc, rows, args.out)}")


if __name__ == "__main__":
    main()
