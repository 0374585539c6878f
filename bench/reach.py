"""How near a fitted avatar could come to frames, by what it is allowed to change (issue 20). Per frame, from
the avatar's own latent at the frame's tracked controls, the latent is optimised against the real frame (L2
+ 1 - MS-SSIM, as the mappers' objective weighs them) with the generator fixed, over:

- the expression offsets (the first layers the expression mapper writes; the pose blend kept): the best any
  expression mapper could do with this pose mapper;
- the pose blend (free weights over the pivots, summing to one; the offsets kept);
- both: the best the mappers' parametrisation could do — what the controls do not carry is what is left
  between the avatar and this;
- every layer of W+ free: what the generator can show at all, the prior's reach.

On the held-out frames and on the training frames (where the mappers were trained: how far they stay from
their own parametrisation's best); with ``--detail-energy``, the loss asks for the real frame's fine detail too.

And, on the held-out frames, latents from the controls without the mappers, rendered by the prior stage's
generator (work/prior_checkpoint.pt): the prior's own prediction from a frame's controls (the part of each
training frame's latent its controls set, without its residual); a kernel regression over the training frames'
latents (Gaussian in the prior's standardised controls, bandwidth KERNEL_BANDWIDTH); those latents regressed
(ridge) on the head pose alone, on it and the jaw, and on all the prior's controls — what each carries of the
held-out frames; and the mean of the real training frames, the blurriest image there is, as a yardstick for
what PSNR rewards. PSNR and the sharpness ratio as `pvp eval` computes them.

    python bench/reach.py [--clips lp_d3 lp_d12] [--variant preset] [--steps 300] [--parts held_out training]

Writes bench/results/reach_<preset>.json.
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
    print_table,
    write_results,
)
from bench.detail import figures, prior_stage  # noqa: E402

FREEDOMS = ("offsets", "blend", "blend + offsets", "W+")
KERNEL_BANDWIDTH = 1.5  # in standard deviations of the controls; 1 to 2 score alike on lp_d12 (18.6-18.7 dB)
RIDGE = 1.0  # the ridge regressions' penalty, on standardised controls
# the prior's control columns (scratch_prior.control_columns) each ridge regression reads
RIDGE_COLUMNS = {"head pose": slice(0, 2), "head pose and jaw": slice(0, 3), "all the prior's controls": slice(None)}


def optimised(avatar, frame_set, freedom: str, steps: int, lr: float, detail_energy: float) -> np.ndarray:
    """Renders [N, R, R, 3] uint8 of the frames' latents optimised over ``freedom`` (FREEDOMS), the loss with
    ``detail_energy`` x the fine-detail energy L1 when > 0."""
    import torch

    from pvp.fit.data import to_tensor
    from pvp.models.generator import to_uint8
    from pvp.models.losses import detail_energy_l1, ms_ssim
    from pvp.models.mappers import mapper_inputs

    pitch_yaw, jaw_expression = mapper_inputs(avatar.clamp(torch.from_numpy(frame_set.controls).float()))
    expr_layers = avatar.mappers.cfg.expr_layers
    with torch.no_grad():
        pivots = avatar.mappers.blended_pivots()
        blend = avatar.mappers.pose.weights(pitch_yaw)
        offsets = avatar.mappers.expression(jaw_expression)[:, :expr_layers]
        w_plus = torch.einsum("bk,kld->bld", blend, pivots)
        w_plus[:, :expr_layers] += offsets
    free = {"blend": blend.clone().requires_grad_("blend" in freedom),
            "offsets": offsets.clone().requires_grad_("offsets" in freedom),
            "W+": w_plus.requires_grad_(freedom == "W+")}
    params = [p for p in free.values() if p.requires_grad]

    def latents() -> torch.Tensor:
        if freedom == "W+":
            return free["W+"]
        weights = free["blend"] / free["blend"].sum(1, keepdim=True)
        w = torch.einsum("bk,kld->bld", weights, pivots)
        return torch.cat([w[:, :expr_layers] + free["offsets"], w[:, expr_layers:]], 1)

    target = to_tensor(frame_set.images)
    optimiser = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        render = avatar.generator.synthesis(latents(), noise_mode="const")
        loss = (render - target).square().flatten(1).mean(1) + (1 - ms_ssim(render, target))
        if detail_energy > 0:
            loss = loss + detail_energy * detail_energy_l1(render, target)
        optimiser.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimiser.step()
    with torch.no_grad():
        return to_uint8(avatar.generator.synthesis(latents(), noise_mode="const")).numpy()


def from_controls(avatar_dir: Path, track, frame_set, positions: np.ndarray) -> dict:
    """At the frames of ``positions`` (their FrameSet ``frame_set``): the prior's linear prediction, the kernel
    regression and the ridge regressions (RIDGE_COLUMNS) over the training frames' latents, rendered by the prior
    stage's generator; and the mean training frame."""
    import torch
    from safetensors.torch import load_file

    from pvp.fit.scratch_prior import control_columns
    from pvp.models.generator import to_uint8

    G, checkpoint = prior_stage(avatar_dir)
    prior = checkpoint["latents"]  # FrameLatents' state: base + proj(controls) + residual per training frame
    saved = load_file(str(avatar_dir / "work" / "latents.safetensors"))
    frames = load_file(str(avatar_dir / "work" / f"frames_{G.cfg.resolution}.safetensors"))
    train_rows = saved["train_rows"].numpy()  # rows of the frames file, as the fit counts them
    position_of = {int(f): k for k, f in enumerate(track.frame_index)}
    train_positions = np.array([position_of[int(frames["frame_index"][r])] for r in train_rows])

    def columns(p: np.ndarray) -> np.ndarray:
        return control_columns(track.yaw_pitch_roll[p, :2], track.jaw_pose[p], track.expression[p])

    train = columns(train_positions)
    mean, std = train.mean(0), np.where(train.std(0) > 1e-8, train.std(0), 1.0)
    if not np.allclose((train - mean) / std, prior["controls"].numpy(), atol=1e-4):
        raise SystemExit(f"{avatar_dir}: the prior's controls are not those of the training frames here")
    query = torch.from_numpy((columns(positions) - mean) / std).float()
    shape = prior["base"].shape[1:]
    frame_w = saved["frame_w"]
    kernel = torch.softmax(-torch.cdist(query, prior["controls"]).square() / (2 * KERNEL_BANDWIDTH ** 2), 1)
    latents = {"prior, linear in the controls":
               prior["base"] + (query @ prior["proj.weight"].T).reshape(len(query), *shape),
               "prior, kernel over the training latents": torch.einsum("bn,nld->bld", kernel, frame_w)}

    def design(c: torch.Tensor, columns_read: slice) -> torch.Tensor:
        return torch.cat([c[:, columns_read], torch.ones(len(c), 1)], 1).double()

    for name, columns_read in RIDGE_COLUMNS.items():
        a = design(prior["controls"], columns_read)
        solution = torch.linalg.solve(a.T @ a + RIDGE * torch.eye(a.shape[1], dtype=a.dtype),
                                      a.T @ frame_w.flatten(1).double())
        latents[f"prior, ridge on {name}"] = (design(query, columns_read) @ solution).float().reshape(-1, *shape)
    with torch.no_grad():
        out = {name: figures(to_uint8(G.synthesis(w, noise_mode="const")).numpy(), frame_set.images)
               for name, w in latents.items()}
    mean_image = frames["images"].numpy()[train_rows].astype(np.float64).mean(0).round().astype(np.uint8)
    out["mean training frame"] = figures(np.repeat(mean_image[None], len(frame_set.images), 0), frame_set.images)
    return out


def main(argv=None):
    import torch

    from pvp.evaluation.evaluate import load_frames

    def add_arguments(ap):
        ap.add_argument("--steps", type=int, default=300, help="optimiser steps per freedom")
        ap.add_argument("--lr", type=float, default=0.01)
        ap.add_argument("--detail-energy", type=float, default=0.0,
                        help="weight of the fine-detail energy L1 in the loss (tiny's mappers: 0.5 of the image terms)")
        ap.add_argument("--parts", nargs="+", default=["held_out", "training"], choices=["held_out", "training"])

    args = fitted_avatar_args(__doc__, "preset", argv, add_arguments)

    os.chdir(ROOT)
    torch.manual_seed(0)
    rows = []
    for clip in args.clips:
        avatar_dir, avatar, track, parts = fitted_clip(args, clip)
        for part in args.parts:
            positions = parts[part]
            frame_set = load_frames(track, positions, avatar)
            row = {"clip": clip, "variant": args.variant, "frames": part, "count": len(frame_set.images),
                   "steps": args.steps, "lr": args.lr, "detail_energy": args.detail_energy,
                   "avatar": figures(avatar.render_uint8(torch.from_numpy(frame_set.controls).float()),
                                     frame_set.images)}
            for freedom in FREEDOMS:
                renders = optimised(avatar, frame_set, freedom, args.steps, args.lr, args.detail_energy)
                row[freedom] = figures(renders, frame_set.images)
            if part == "held_out":
                row.update(from_controls(avatar_dir, track, frame_set, positions))
            rows.append(row)
            print(row, flush=True)
            write_results(f"reach_{args.preset}", device_description("cpu"), rows, args.out)
    print_table([{"clip": r["clip"], "frames": r["frames"], "latent": k, **r[k]}
                 for r in rows for k in r if isinstance(r[k], dict)], ["clip", "frames", "latent", "psnr", "sharpness"])


if __name__ == "__main__":
    main()
