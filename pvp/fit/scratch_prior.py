"""The personal prior learned from scratch (no pretrained generator): a small StyleGAN2 generator and one
W+ latent per training frame, learned together (generative latent optimisation). Each frame's latent is
its controls' linear prediction plus a small residual, so the latent space is organised by head pose and
expression and blends of pivot latents stay meaningful."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pvp.fit.presets import Preset
from pvp.fit.training import run_steps, step_generator
from pvp.models.generator import Generator, GeneratorConfig
from pvp.models.losses import PerceptualLoss


class FrameLatents(nn.Module):
    """w_i = base + proj(controls_i) + residual_i, in W+ ([num_ws, w_dim] per frame)."""

    def __init__(self, controls: torch.Tensor, num_ws: int, w_dim: int):
        super().__init__()
        self.register_buffer("controls", controls.float())
        self.base = nn.Parameter(torch.randn(1, num_ws, w_dim))
        self.proj = nn.Linear(controls.shape[1], num_ws * w_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.3 / max(1, controls.shape[1]) ** 0.5)
        self.residual = nn.Parameter(torch.zeros(len(controls), num_ws, w_dim))
        self.num_ws, self.w_dim = num_ws, w_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pred = self.proj(self.controls[idx]).reshape(len(idx), self.num_ws, self.w_dim)
        return self.base + pred + self.residual[idx]


def standardized_controls(yaw_pitch: np.ndarray, jaw: np.ndarray, expression: np.ndarray, n_expr: int = 16):
    c = np.concatenate([yaw_pitch, jaw[:, :1], expression[:, :n_expr]], 1).astype(np.float64)
    std = c.std(0)
    return torch.from_numpy((c - c.mean(0)) / np.where(std > 1e-8, std, 1.0))


def reconstruction_loss(perceptual: PerceptualLoss, img: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (img - target).square().mean() + perceptual(img, target).mean()


def train_scratch_prior(frames: torch.Tensor, controls: torch.Tensor, preset: Preset, checkpoint: Path,
                        device, resume: bool, seed: int = 0, progress: bool = True):
    """frames [N, 3, R, R] in [-1, 1]. Returns (generator, latents module, last metrics)."""
    torch.manual_seed(seed)
    cfg = GeneratorConfig(resolution=preset.resolution, channels=preset.channels, z_dim=preset.w_dim,
                          w_dim=preset.w_dim, mapping_layers=preset.mapping_layers)
    G = Generator(cfg).to(device).train()
    latents = FrameLatents(controls, cfg.num_ws, cfg.w_dim).to(device)
    perceptual = PerceptualLoss("msssim")
    opt_g = torch.optim.Adam(G.synthesis.parameters(), lr=preset.prior_lr, betas=(0.0, 0.99))
    opt_l = torch.optim.Adam(latents.parameters(), lr=preset.latent_lr)
    frames = frames.to(device)

    def step(i: int) -> dict[str, torch.Tensor]:
        decay = min(1.0, 2.0 * (1 - i / preset.prior_steps)) if preset.prior_steps else 1.0
        for opt, lr in ((opt_g, preset.prior_lr), (opt_l, preset.latent_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * max(decay, 0.05)
        gen = step_generator(seed, i, device)
        idx = torch.randint(len(frames), (preset.prior_batch,), generator=gen, device=gen.device).to(device)
        img = G.synthesis(latents(idx), noise_mode="const")
        rec = reconstruction_loss(perceptual, img, frames[idx])
        loss = rec + preset.residual_weight * latents.residual[idx].square().mean()
        opt_g.zero_grad(set_to_none=True)
        opt_l.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_l.step()
        return {"loss": loss.detach(), "rec": rec.detach()}

    metrics = run_steps("prior (from scratch)", preset.prior_steps, step,
                        {"generator": G, "latents": latents, "opt_g": opt_g, "opt_l": opt_l}, checkpoint,
                        preset.checkpoint_every, resume, progress)
    G.eval().requires_grad_(False)
    with torch.no_grad():
        all_w = latents(torch.arange(len(frames), device=device))
        G.mapping.w_avg.copy_(all_w.mean(dim=(0, 1)))
    return G, latents.eval().requires_grad_(False), metrics
