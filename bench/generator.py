"""Generator speed: median forward time after warm-up and images/s, batch 1 and a larger batch, at
256/512/1024 with config-f widths, fp32 and half precision (fp16 and bf16 on CUDA; bf16 on CPU).

    python bench/generator.py [--device cpu|cuda] [--resolutions 256 512 1024] [--batch 8] [--repeat N]
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_description, median_time, print_table, write_results  # noqa: E402
from pvp.models.generator import Generator, GeneratorConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, default=None, help="the larger batch (default 32 on CUDA, 4 on CPU)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--dtypes", nargs="+", default=None, help="float32 float16 bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    big = args.batch or (32 if cuda else 4)
    repeat = args.repeat or (50 if cuda else 3)
    dtypes = args.dtypes or (["float32", "float16", "bfloat16"] if cuda else ["float32", "bfloat16"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for res in args.resolutions:
        G = Generator(GeneratorConfig(resolution=res)).eval().requires_grad_(False).to(device)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for batch in (1, big):
                ws = torch.randn(batch, G.num_ws, 512, device=device)
                with torch.inference_mode():
                    t = median_time(partial(G.synthesis, ws, dtype=dtype), warmup=3 if cuda else 1,
                                    repeat=repeat, sync=sync)
                rows.append({"resolution": res, "dtype": dtype_name, "batch": batch, "ms_per_batch": round(t * 1e3, 2),
                             "images_per_s": round(batch / t, 1)})
                print(f"{res}px {dtype_name} batch {batch}: {t * 1e3:.1f} ms, {batch / t:.1f} img/s", flush=True)
        del G
    desc = device_description(device)
    print(f"\nStyleGAN2 synthesis, config-f widths, on {desc}")
    print_table(rows, ["resolution", "dtype", "batch", "ms_per_batch", "images_per_s"])
    print(f"written to {write_results('generator', desc, rows, args.out)}")


if __name__ == "__main__":
    main()
