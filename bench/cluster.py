"""Timeline render on Ray: frames/s against the number of workers (local Ray, CPU workers here; GPU workers on
a cluster with GPUs), beside the single-process render of the same frames. Each run renders the timeline
into an empty folder, so its time includes starting the workers and loading the avatar in each.

    python bench/cluster.py [--resolution 128] [--frames 96] [--workers 1 2] [--batch 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import print_table, write_results  # noqa: E402
from pvp.avatar import AvatarMeta, random_avatar  # noqa: E402
from pvp.serve import cluster  # noqa: E402
from pvp.serve.batch_render import Shot, render_shots_here  # noqa: E402


def timeline(avatar_dir: Path, frames: int, folder: Path, seed: int = 0) -> Shot:
    meta = AvatarMeta.read(avatar_dir)
    rng = np.random.default_rng(seed)
    lo = np.array([c["min"] for c in meta.schema["channels"]], np.float32)
    hi = np.array([c["max"] for c in meta.schema["channels"]], np.float32)
    ctrl = (lo + (hi - lo) * rng.random((frames, len(lo)))).astype(np.float32)
    return Shot(avatar_dir, list(range(frames)), ctrl, folder, avatar_id=meta.id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cluster", default="local", help="local (CPU workers, one per core) or ray://HOST:PORT")
    args = ap.parse_args(argv)
    import ray
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="pvp-bench-cluster-"))
    avatar_dir = tmp / "avatar"
    random_avatar(resolution=args.resolution, expression_dim=8).save(avatar_dir)
    rows = []
    t0 = time.perf_counter()
    render_shots_here([timeline(avatar_dir, args.frames, tmp / "here")], batch=args.batch, progress=False)
    seconds = time.perf_counter() - t0
    rows.append({"engine": "one process", "workers": 1, "threads_per_worker": torch.get_num_threads(),
                 "frames": args.frames, "seconds": round(seconds, 2), "frames_per_s": round(args.frames / seconds, 1)})
    with cluster.connected(args.cluster):
        kind = "GPU" if "num_gpus" in cluster.worker_resources(ray) else "CPU"
        for n in args.workers:
            shot = timeline(avatar_dir, args.frames, tmp / f"ray{n}")
            shot.folder.mkdir()
            t0 = time.perf_counter()
            cluster.ClusterRender([shot], workers=n, batch=args.batch, device="auto").run(progress=False)
            seconds = time.perf_counter() - t0
            rows.append({"engine": f"Ray ({args.cluster}, {kind} workers)", "workers": n, "threads_per_worker": 1,
                         "frames": args.frames, "seconds": round(seconds, 2),
                         "frames_per_s": round(args.frames / seconds, 1)})
    print_table(rows, ["engine", "workers", "threads_per_worker", "frames", "seconds", "frames_per_s"])
    device = f"{args.resolution} px avatar, batch {args.batch}, {args.cluster} Ray"
    print(f"wrote {write_results('cluster', device, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
