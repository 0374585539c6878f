"""Pivotal tuning over all pivots at once (paper Eq. 5, PTI's multi-ID coach) with PTI's locality
regularizer: latents drawn around the pivots, towards random samples of the original generator, must
render as the original generator renders them."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from pvp.fit.presets import Preset
from pvp.fit.training import run_steps, step_generator
from pvp.models.generator import Generator
from pvp.models.losses import PerceptualLoss

log = logging.getLogger(__name__)


def locality_latents(G_orig: Generator, pivots: torch.Tensor, alpha: float, psi: float,
                     gen: torch.Generator) -> torch.Tensor:
    """w_r = w_p + alpha (w_z - w_p) / |w_z - w_p|, w_z = mapping(z) truncated with psi (PTI's recipe)."""
    b = len(pivots)
    z = torch.randn(b, G_orig.cfg.z_dim, generator=gen).to(pivots.device)
    with torch.no_grad():
        w_z = G_orig.map_z(z, truncation_psi=psi)
    d = w_z - pivots
    return pivots + alpha * d / d.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]


def pivotal_tuning(G_orig: Generator, pivots: torch.Tensor, targets: torch.Tensor, perceptual: PerceptualLoss,
                   preset: Preset, checkpoint: Path, resume: bool, batch: int = 1, locality: bool = True,
                   seed: int = 0, progress: bool = True) -> tuple[Generator, dict]:
    """Returns the tuned copy of G_orig (synthesis and mapping tuned, as PTI does) and the last metrics.
    The run stops early once the perceptual loss of an epoch is under the preset's LPIPS threshold."""
    G = copy.deepcopy(G_orig).train().requires_grad_(True)
    G_orig = G_orig.eval().requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), lr=preset.pti_lr)
    k = len(pivots)
    steps = max(1, preset.pti_steps_per_pivot * k // batch)
    epoch_losses: list[float] = []
    use_threshold = perceptual.kind.startswith("lpips")

    def step(i: int) -> dict[str, float]:
        gen = step_generator(seed, i)
        idx = torch.randint(k, (batch,), generator=gen).to(pivots.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pivots.is_cuda):  # mixed precision on GPUs
            img = G.synthesis(pivots[idx], noise_mode="const")
            p_loss = perceptual(img, targets[idx]).mean()
            loss = p_loss + preset.pti_l2_weight * (img - targets[idx]).square().mean()
            metrics = {"perceptual": p_loss.item()}
            if locality:
                w_r = locality_latents(G_orig, pivots[idx], preset.locality_alpha, preset.locality_truncation, gen)
                with torch.no_grad():
                    ref = G_orig.synthesis(w_r, noise_mode="none")
                new = G.synthesis(w_r, noise_mode="none")
                reg = (preset.locality_weight_l2 * (new - ref).square().mean()
                       + preset.locality_weight_perceptual * perceptual(new, ref).mean())
                loss = loss + reg
                metrics["locality"] = reg.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        epoch_losses.append(metrics["perceptual"])
        return metrics

    metrics = run_steps("pivotal tuning", steps, _early_stopping(step, epoch_losses, max(1, k // batch),
                                                                  preset.pti_lpips_threshold if use_threshold else None),
                        {"generator": G, "opt": opt}, checkpoint, preset.checkpoint_every, resume, progress)
    return G.eval().requires_grad_(False), metrics


def _early_stopping(step_fn, history: list[float], epoch: int, threshold: float | None):
    if threshold is None:
        return step_fn

    def wrapped(i):
        metrics = step_fn(i)
        if len(history) >= epoch and sum(history[-epoch:]) / epoch <= threshold:
            metrics["converged"] = 1.0
        return metrics

    return wrapped
