"""Pivotal tuning over all pivots at once (paper Eq. 5, PTI's multi-ID coach) with PTI's locality
regularizer: latents drawn around the pivots, towards random samples of the original generator, must
render as the original generator renders them.

Two schedules (Preset.pti_batch, pti_stop): the authors' one pivot per step, stopping when the perceptual
loss averaged over an epoch is under the threshold ('epoch'); or a batch of pivots per step, each pivot
left out of the draw once its own last perceptual loss is under the threshold ('pivot')."""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch

from pvp.fit.presets import PTI_STOPS, Preset
from pvp.fit.training import run_steps, schedule_lr, step_generator
from pvp.models.generator import Generator
from pvp.models.losses import PerceptualLoss

log = logging.getLogger(__name__)


def locality_latents(G_orig: Generator, pivots: torch.Tensor, alpha: float, psi: float,
                     gen: torch.Generator) -> torch.Tensor:
    """w_r = w_p + alpha (w_z - w_p) / |w_z - w_p|, w_z = mapping(z) truncated with psi (PTI's recipe)."""
    b = len(pivots)
    z = torch.randn(b, G_orig.cfg.z_dim, generator=gen, device=gen.device).to(pivots.device)
    with torch.no_grad():
        w_z = G_orig.map_z(z, truncation_psi=psi)
    d = w_z - pivots
    return pivots + alpha * d / d.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]


class PivotDraw:
    """Which pivots a step tunes, drawn on the device. 'pivot' stop: each pivot's last perceptual loss is
    kept, and a pivot under the threshold is drawn only when fewer than a batch are left above it."""

    def __init__(self, k: int, batch: int, stop: str, threshold: float | None, device):
        assert stop in PTI_STOPS, stop
        self.k, self.batch, self.stop, self.threshold = k, batch, stop, threshold
        self.last_loss = torch.full((k,), math.inf, device=device)
        self.epoch = max(1, k // batch)
        self.history = torch.full((self.epoch,), math.inf, device=device)  # the last epoch's batch losses

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        if self.stop == "epoch" or self.threshold is None or self.batch > self.k:
            return torch.randint(self.k, (self.batch,), generator=gen, device=gen.device).to(self.last_loss.device)
        weight = (self.last_loss > self.threshold).float() + 1e-6
        u = torch.rand(self.k, generator=gen, device=gen.device).to(weight.device).clamp(min=1e-12)
        return (weight.log() - (-u.log()).log()).topk(self.batch).indices  # Gumbel top-k: no replacement

    def update(self, step: int, idx: torch.Tensor, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.last_loss.index_copy_(0, idx, loss)
        self.history[step % self.epoch] = loss.mean()

    def converged(self) -> bool:
        if self.threshold is None:
            return False
        if self.stop == "epoch":
            return bool(self.history.mean() <= self.threshold)
        return bool((self.last_loss <= self.threshold).all())

    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss.clone(), "history": self.history.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.last_loss.copy_(state["last_loss"])
        self.history.copy_(state["history"])


def pivotal_tuning(G_orig: Generator, pivots: torch.Tensor, targets: torch.Tensor, perceptual: PerceptualLoss,
                   preset: Preset, checkpoint: Path, resume: bool, locality: bool = True, seed: int = 0,
                   progress: bool = True) -> tuple[Generator, dict]:
    """Returns the tuned copy of G_orig (synthesis and mapping tuned, as PTI does) and the last metrics."""
    G = copy.deepcopy(G_orig).train().requires_grad_(True)
    G_orig = G_orig.eval().requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), lr=preset.pti_lr)
    k, device = len(pivots), pivots.device
    threshold = preset.pti_lpips_threshold if perceptual.kind.startswith("lpips") else None
    draw = PivotDraw(k, min(preset.pti_batch, k), preset.pti_stop, threshold, device)
    steps = preset.optimiser_steps(pretrained=True, pivots=k)["tuning"]  # each pivot pti_steps_per_pivot times

    def step(i: int) -> dict[str, torch.Tensor]:
        schedule_lr(opt, preset.pti_lr, preset.lr_schedule, i, steps)
        gen = step_generator(seed, i, device)
        idx = draw.draw(gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pivots.is_cuda):  # mixed precision on GPUs
            img = G.synthesis(pivots[idx], noise_mode="const")
            p_loss = perceptual(img, targets[idx])
            loss = p_loss.mean() + preset.pti_l2_weight * (img - targets[idx]).square().mean()
            metrics = {"perceptual": p_loss.mean()}
            if locality:
                w_r = locality_latents(G_orig, pivots[idx], preset.locality_alpha, preset.locality_truncation, gen)
                with torch.no_grad():
                    ref = G_orig.synthesis(w_r, noise_mode="none")
                new = G.synthesis(w_r, noise_mode="none")
                reg = (preset.locality_weight_l2 * (new - ref).square().mean()
                       + preset.locality_weight_perceptual * perceptual(new, ref).mean())
                loss = loss + reg
                metrics["locality"] = reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        draw.update(i, idx, p_loss)
        return {name: value.detach() for name, value in metrics.items()}

    metrics = run_steps("pivotal tuning", steps, step, {"generator": G, "opt": opt, "draw": draw},
                        checkpoint, preset.checkpoint_every, resume, progress, converged=draw.converged)
    return G.eval().requires_grad_(False), metrics
