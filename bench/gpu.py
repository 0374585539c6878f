"""Issue 22's GPU figures, the old code and the new side by side, each row appended to the JSON as it is
measured: synthesis 1024 at batch 1 and 32 in fp32 and fp16, synthesis batch 1 fp16 captured in a CUDA
graph, the renderer at batch 1 (mappers + synthesis + uint8 on the host), and `pvp serve` + clients
(1024 -> 512 RGBA): streamed FPS and the single-frame round trip with 1, 4 and 16 clients.

    python bench/gpu.py --old OLD_TREE [--out bench/results/gpu.json] [--cpu-smoke]

OLD_TREE is a copy of pvp, pvp_contract and bench before issue 22 (bench/gpu.sh makes one with git). Every
measurement runs in a child process whose working directory and PYTHONPATH are one tree. --cpu-smoke runs
every step on the CPU at 32 px with tiny counts, to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)


def _timer(device):
    """median_ms(fn, warmup, repeat), waiting for the GPU's queued work around each call."""
    import torch

    from bench.common import median_time  # the child's tree's (both trees have it)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return lambda fn, warmup, repeat: median_time(fn, warmup, repeat, sync) * 1e3


def worker_synthesis(p: dict) -> list[dict]:
    import torch

    from pvp.models.generator import Generator, GeneratorConfig

    median_ms = _timer(p["device"])
    G = Generator(GeneratorConfig(p["resolution"])).eval().requires_grad_(False).to(p["device"])
    rows = []
    for dtype in ("float32", "float16"):
        for batch in p["batches"]:
            ws = torch.randn(batch, G.num_ws, 512, device=p["device"])
            with torch.inference_mode():
                ms = median_ms(lambda: G.synthesis(ws, dtype=getattr(torch, dtype)), p["warmup"], p["repeat"])
            rows.append({"figure": f"synthesis {p['resolution']}px batch {batch} {dtype}", "ms": round(ms, 3),
                         "fps": round(batch * 1e3 / ms, 1)})
    if p["device"] == "cuda":  # the same synthesis replayed from a CUDA graph (batch 1, fp16)
        ws = torch.randn(1, G.num_ws, 512, device="cuda")
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    G.synthesis(ws, dtype=torch.float16)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                G.synthesis(ws, dtype=torch.float16)
            ms = median_ms(graph.replay, p["warmup"], p["repeat"])
        rows.append({"figure": f"synthesis {p['resolution']}px batch 1 float16, CUDA graph", "ms": round(ms, 3),
                     "fps": round(1e3 / ms, 1)})
    return rows


def worker_renderer(p: dict) -> list[dict]:
    from pvp.avatar import Avatar
    from pvp.serve.render_service import FrameJob, RenderService
    from pvp_contract import controls

    median_ms = _timer(p["device"])
    service = RenderService(Avatar.load(p["avatar"], p["device"]), max_batch=16)
    service.warm_up()
    job = FrameJob(controls.defaults(service.avatar.meta.schema), {}, "rgb8", None, 90)
    ms = median_ms(lambda: service.render_rgb([job]), p["warmup"], p["repeat"])
    return [{"figure": "renderer batch 1 (mappers + synthesis + uint8 on the host), fp32", "ms": round(ms, 3),
             "fps": round(1e3 / ms, 1)}]


def _client_run(args: tuple) -> dict:
    endpoint, defaults, frames, round_trips, seed = args
    from pvp_contract.client import Client

    client = Client(endpoint, timeout_s=300)
    client.hello()
    seq = [[v + 1e-3 * (seed * 100_000 + i) for v in defaults] for i in range(frames)]
    t0 = time.perf_counter()
    n = sum(1 for _ in client.render_sequence(seq, fmt="rgba8", size=512))
    streamed = time.perf_counter() - t0
    times = []
    for i in range(round_trips):
        t0 = time.perf_counter()
        client.render(seq[i % frames], fmt="rgba8", size=512, use_cache=False)
        times.append(time.perf_counter() - t0)
    client.close()
    return {"frames": n, "stream_s": streamed, "round_trips_ms": [t * 1e3 for t in times]}


def worker_server(p: dict) -> list[dict]:
    from pvp.serve.process import ServerProcess
    from pvp_contract import controls

    rows = []
    for half in (False, True) if p["device"] == "cuda" else (False,):
        extra = ["--half"] if half else []
        with ServerProcess(p["avatar"], *extra, threads=None, device=p["device"]) as server:
            meta = json.loads((Path(p["avatar"]) / "avatar.json").read_text())
            defaults = controls.defaults(meta["control_schema"])
            _client_run((server.endpoint, defaults, 4, 2, 99))  # warm-up
            for n in CLIENTS:
                t0 = time.perf_counter()
                with Pool(n) as pool:
                    results = pool.map(_client_run, [(server.endpoint, defaults, p["frames"], p["round_trips"], i)
                                                     for i in range(n)])
                wall = time.perf_counter() - t0
                frames = sum(r["frames"] for r in results)
                trips = [t for r in results for t in r["round_trips_ms"]]
                name = "--half" if half else "fp32"
                rows.append({"figure": f"pvp serve {name}, {n} client(s), 1024 -> 512 RGBA",
                             "streamed_fps": round(frames / max(r["stream_s"] for r in results), 1),
                             "round_trip_ms_median": round(statistics.median(trips), 2),
                             "round_trip_ms_max": round(max(trips), 2), "wall_s": round(wall, 1)})
    return rows


WORKERS = {"synthesis": worker_synthesis, "renderer": worker_renderer, "server": worker_server}


def run_in_tree(tree: Path, what: str, params: dict) -> list[dict]:
    """One measurement in a child process that imports pvp from ``tree``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    code = ("import importlib.util, json, sys; "
            "spec = importlib.util.spec_from_file_location('gpu_bench', sys.argv[1]); "
            "m = sys.modules['gpu_bench'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('ROWS', json.dumps(m.WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, __file__, what, json.dumps(params)], cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return [{"figure": what, "error": out.stderr[-3000:]}]
    return json.loads(out.stdout.rsplit("ROWS ", 1)[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="a tree with pvp, pvp_contract, bench before issue 22")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU, 32 px, tiny counts")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import device_description
    from pvp.avatar import random_avatar
    from pvp.models.generator import GeneratorConfig
    from pvp_contract.atomic import write_text

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    res = 32 if smoke else 1024
    timing = {"device": device, "warmup": 1 if smoke else 10, "repeat": 2 if smoke else 100}
    plan = [("synthesis", {**timing, "resolution": res, "batches": [1, 2] if smoke else [1, 32]}),
            ("renderer", timing),
            ("server", {**timing, "frames": 4 if smoke else 300, "round_trips": 2 if smoke else 50})]
    payload = {"bench": "gpu", "device": device_description(device), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        avatar = Path(tmp) / "avatar"  # config-f widths (mapping shortened: it is not timed alone)
        random_avatar(generator=GeneratorConfig(res, mapping_layers=2)).save(avatar)
        for what, params in plan:
            for label, tree in (("old", args.old.resolve()), ("new", ROOT)):
                t0 = time.perf_counter()
                rows = run_in_tree(tree, what, {**params, "avatar": str(avatar)})
                for r in rows:
                    payload["rows"].append({"path": label, **r})
                    print(label, json.dumps(r)[:400], flush=True)
                payload["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                write_text(args.out, json.dumps(payload, indent=1) + "\n")
                print(f"  ({what}, {label}: {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
