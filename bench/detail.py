"""Where the avatar's fine detail goes (issue 20). Per clip, for a fitted avatar (bench/prior.py's fits):

- the prior: its generator, as the prior stage left it (work/prior_checkpoint.pt), at the training frames'
  own latents, against those frames — what the prior learned before any mapper;
- the avatar on its training frames (their tracked controls through the mappers) and on the held-out ones;
- the same controls with the pose mapper's blend over the pivots made sharper (its negative weights set to 0,
  the rest raised to a power and renormalised; the heaviest pivot alone), the expression offsets kept: whether
  the blend of many pivots' latents is what blurs; and each blend without the expression offsets. And how many
  pivots the blend spreads over (1 / sum of squared weights).

PSNR and the sharpness ratio (variance of the Laplacian, render over real frame) as `pvp eval` computes them.

    python bench/detail.py [--clips lp_d3 lp_d12] [--variant preset]

Writes bench/results/detail_<preset>.json.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    device_description,
    fitted_avatar_args,
    fitted_clip,
    held_out_split,
    print_table,
    write_results,
)

POWERS = (2, 4)  # the pose blend's weights raised to these powers


def figures(renders: np.ndarray, real: np.ndarray) -> dict:
    from pvp.evaluation.evaluate import sharpness
    from pvp.fit.data import to_tensor
    from pvp.models.losses import psnr

    return {"psnr": round(float(psnr(to_tensor(renders), to_tensor(real)).mean()), 2),
            "sharpness": round(float((sharpness(renders) / sharpness(real)).mean()), 3)}


def prior_stage(avatar_dir: Path):
    """The generator as the prior stage left it (work/prior_checkpoint.pt) and that checkpoint's state."""
    import torch

    from pvp.checkpoints import load_generator

    checkpoint = torch.load(avatar_dir / "work" / "prior_checkpoint.pt", map_location="cpu", weights_only=True)
    G = load_generator(avatar_dir / "generator.safetensors")
    G.load_state_dict(checkpoint["generator"])
    return G, checkpoint


def prior_reconstructions(avatar_dir: Path) -> dict:
    """The prior stage's generator at the training frames' latents, against the aligned training frames."""
    import torch
    from safetensors.torch import load_file

    from pvp.models.generator import to_uint8

    work = avatar_dir / "work"
    G, _ = prior_stage(avatar_dir)
    latents = load_file(str(work / "latents.safetensors"))
    real = load_file(str(work / f"frames_{G.cfg.resolution}.safetensors"))["images"].numpy()
    real = real[latents["train_rows"].numpy()]
    w = latents["frame_w"]
    with torch.no_grad():
        renders = np.concatenate([to_uint8(G.synthesis(w[i:i + 32], noise_mode="const")).numpy()
                                  for i in range(0, len(w), 32)])
    return figures(renders, real)


def blends(avatar, frame_set) -> dict:
    """The avatar at the frames' controls, and with its pose blend made sharper; the blend's spread."""
    import torch

    from pvp.models.generator import to_uint8
    from pvp.models.mappers import mapper_inputs

    pitch_yaw, jaw_expression = mapper_inputs(avatar.clamp(torch.from_numpy(frame_set.controls).float()))
    with torch.no_grad():
        weights = avatar.mappers.pose.weights(pitch_yaw)
        offsets = avatar.mappers.expression(jaw_expression)
        pivots = avatar.mappers.blended_pivots()
    sharper = {"avatar": weights, "argmax": torch.nn.functional.one_hot(weights.argmax(1), weights.shape[1]).float()}
    for p in POWERS:
        raised = weights.clamp(min=0) ** p
        sharper[f"weights^{p}"] = raised / raised.sum(1, keepdim=True)
    out = {"effective_pivots": round(float((1 / (weights ** 2).sum(1)).median()), 2)}
    for name, blend in sharper.items():
        w = torch.einsum("bk,kld->bld", blend, pivots)
        for label, latents in ((name, w + offsets), (f"{name}, no offsets", w)):
            with torch.no_grad():
                renders = to_uint8(avatar.generator.synthesis(latents, noise_mode="const")).numpy()
            out[label] = figures(renders, frame_set.images)
    return out


def main(argv=None):
    from pvp.evaluation.evaluate import load_frames

    args = fitted_avatar_args(__doc__, "preset", argv)

    os.chdir(ROOT)
    rows = []
    for clip in args.clips:
        _, held_out = held_out_split(Path("tests") / "data" / f"{clip}.mp4")
        avatar_dir, avatar, track, parts = fitted_clip(args, clip)
        row = {"clip": clip, "variant": args.variant, "held_out_frames": held_out,
               "prior_on_training_frames": prior_reconstructions(avatar_dir)}
        for part, positions in parts.items():
            row[part] = blends(avatar, load_frames(track, positions, avatar))
        rows.append(row)
        print(clip, row, flush=True)
    write_results(f"detail_{args.preset}", device_description("cpu"), rows, args.out)
    table = [{"clip": r["clip"], "stage": stage, "blend": blend, **r[stage][blend]}
             for r in rows for stage in ("training", "held_out")
             for blend in ("avatar", "weights^4", "argmax", "avatar, no offsets", "argmax, no offsets")]
    table += [{"clip": r["clip"], "stage": "training", "blend": "prior, frame latents",
               **r["prior_on_training_frames"]} for r in rows]
    print_table(table, ["clip", "stage", "blend", "psnr", "sharpness"])


if __name__ == "__main__":
    main()
