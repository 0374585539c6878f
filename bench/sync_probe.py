"""Where the fit's step loops make the host wait for the GPU: PyTorch's sync debug mode on, a few dozen
steps of pivotal tuning and of mapper training at the paper preset's full size (random weights), each
synchronising call counted by where it happened in pvp's code (the logging steps' reads are expected).
CUDA only; tests/test_fit_schedule.py checks the same on the meta device without a GPU.

    python bench/sync_probe.py --track TRACK.safetensors --landmarks face_landmark.tflite [--out JSON]
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import device_description, write_results  # noqa: E402


def where(stack) -> str:
    """The innermost frame in pvp's own code."""
    frames = [f for f in stack if "/pvp/" in f.filename and "sync_probe" not in f.filename]
    f = frames[-1] if frames else stack[-1]
    return f"{Path(f.filename).relative_to(ROOT) if ROOT in Path(f.filename).parents else f.filename}:{f.lineno}"


def probe(name: str, fn, device) -> dict:
    import torch

    seen: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen[where(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    print(f"{name}: {sum(seen.values())} synchronising calls", *(f"  {n} x {k}" for k, n in seen.most_common()),
          sep="\n", flush=True)
    return {"loop": name, "syncs": sum(seen.values()), "where": dict(seen)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", type=Path, required=True)
    ap.add_argument("--landmarks", type=Path, required=True, help="MediaPipe's face_landmark.tflite")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu: only to check this script (no sync mode there)")
    ap.add_argument("--resolution", type=int, default=1024, help="the generator's (smaller only to check the script)")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    from pvp.fit.mapper_training import MapperData, train_mappers
    from pvp.fit.presets import PRESETS
    from pvp.fit.pti import pivotal_tuning
    from pvp.models.arcface import ArcFace, IdentityLoss
    from pvp.models.generator import default_channels
    from pvp.tracking.differentiable import DifferentiableTracker
    from pvp.tracking.track import Track
    from tests.official_layouts import random_generator, random_lpips_vgg

    device = torch.device(args.device)
    preset = PRESETS["paper"].with_overrides(checkpoint_every=10**9)
    size = args.resolution
    G = random_generator(resolution=size, w_dim=512, channels=default_channels(size)).to(device)
    perceptual = random_lpips_vgg(device)  # the paper preset's loss, its VGG random: no file needed
    k, n = 32, 24
    pivots = G.map_z(torch.randn(k, 512, device=device)).detach()
    targets = torch.rand(k, 3, size, size, device=device) * 2 - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tuning = preset.with_overrides(pti_steps_per_pivot=args.steps * preset.pti_batch // k)
        rows.append(probe("pivotal tuning", lambda: pivotal_tuning(G, pivots, targets, perceptual, tuning,
                                                                   Path(tmp) / "p.pt", False, progress=False), device))
        track = Track.load(args.track)
        tracker = DifferentiableTracker(track.face_model, landmark_model=args.landmarks).to(device)
        identity = IdentityLoss(ArcFace().eval().requires_grad_(False).to(device))
        je = torch.randn(n, 3 + 20, device=device) * 0.1
        loss_size = min(size, preset.objective.loss_resolution)
        data = MapperData(torch.randn(n, 2, device=device) * 0.2, je, torch.rand(n, 3, loss_size, loss_size,
                          device=device), torch.ones(n, 1, loss_size, loss_size, device=device), je.min(0).values,
                          je.max(0).values)
        rows.append(probe("mapper training", lambda: train_mappers(
            G, pivots, data, perceptual, args.steps, preset.mapper_batch, preset.mapper_lr, Path(tmp) / "m.pt",
            10**9, False, tracker, identity, objective=preset.objective, progress=False), device))
    print(write_results("sync_probe", device_description(device), rows, args.out))


if __name__ == "__main__":
    main()
