"""Inversion of the pivot frames into a pretrained generator's W+ (paper Eq. 1): e4e when its checkpoint
is given, otherwise optimisation from the average latent, first in W, then in W+ (perceptual + L2)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from pvp.models.generator import Generator
from pvp.models.losses import PerceptualLoss


def optimize_latents(G: Generator, targets: torch.Tensor, perceptual: PerceptualLoss, w_steps: int,
                     wplus_steps: int, lr: float, batch: int = 8, micro_batch: int | None = None,
                     progress: bool = True) -> torch.Tensor:
    """targets [K, 3, R, R] in [-1, 1] -> W+ [K, num_ws, w_dim]. Each optimiser step moves ``batch`` latents,
    their gradients computed ``micro_batch`` images at a time (memory); every latent has its own loss, so the
    steps are those of one latent optimised alone (Adam scales each coordinate by its own gradients)."""
    micro_batch = micro_batch or batch
    device = targets.device
    out = []
    w_avg = G.mapping.w_avg.detach()
    starts = range(0, len(targets), batch)
    bar = tqdm(total=len(starts) * (w_steps + wplus_steps), desc="invert pivots", unit="step", disable=not progress)
    for start in starts:
        target = targets[start:start + batch]
        w = w_avg.repeat(len(target), 1).clone().requires_grad_(True)
        for phase, steps in (("w", w_steps), ("w+", wplus_steps)):
            if phase == "w+":
                w = w.detach().unsqueeze(1).repeat(1, G.num_ws, 1).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            for i in range(steps):
                for group in opt.param_groups:  # cosine ramp-down, as NVIDIA's projector
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / max(steps, 1)))
                ws = w.unsqueeze(1).repeat(1, G.num_ws, 1) if phase == "w" else w
                opt.zero_grad(set_to_none=True)
                for part in range(0, len(target), micro_batch):
                    chunk = slice(part, part + micro_batch)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.is_cuda):  # as tuning
                        img = G.synthesis(ws[chunk], noise_mode="const")
                        loss = (img - target[chunk]).square().mean() + perceptual(img, target[chunk]).mean()
                    (loss * len(img) / len(target)).backward(retain_graph=part + micro_batch < len(target))
                opt.step()
                bar.update()
        out.append(w.detach())
    bar.close()
    return torch.cat(out).to(device)
