"""The personal prior learned from scratch (no pretrained generator): a small StyleGAN2 generator and one
W+ latent per training frame, learned together (generative latent optimisation). Each frame's latent is
its controls' linear prediction plus a small residual, so the latent space is organised by head pose and
expression and blends of pivot latents stay meaningful.

A generator fitted to a few hundred latents alone is a lookup table: between them (where the mappers' pivot
blends and expression offsets land) its renders smear. Optional terms train it there (off in every preset:
bench/RESULTS.md, "The from-scratch prior away from its training frames", measures them): in-betweens — a
share of each batch rendered from two nearby frames' latents blended at the frame's own time, against the
real frame; an adversarial term — renders of training latents blended with independent pose and face
weights, judged by a small discriminator against the real frames, both through differentiable augmentation;
a Laplacian-pyramid L1 term for the finest detail; and a fine-detail energy term, which asks each patch of a
render for as much pixel-level detail as the real frame has there, in place or not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pvp.fit.presets import Preset
from pvp.fit.training import render_dtype, run_steps, step_generator
from pvp.models.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    diff_augment,
    discriminator_step,
    generator_adversarial_loss,
)
from pvp.models.generator import Generator, GeneratorConfig
from pvp.models.losses import PerceptualLoss, detail_energy_l1, laplacian_l1

POSE_COLUMNS = 2  # standardized_controls: yaw, pitch, then jaw and expression


class FrameLatents(nn.Module):
    """w_i = base + proj(controls_i) + residual_i, in W+ ([num_ws, w_dim] per frame); ``times`` [N] are the
    frames' numbers in the video, in order (default 0..N-1)."""

    def __init__(self, controls: torch.Tensor, num_ws: int, w_dim: int, times: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("controls", controls.float())
        self.register_buffer("times", torch.arange(len(controls)).float() if times is None else times.float())
        self.base = nn.Parameter(torch.randn(1, num_ws, w_dim))
        self.proj = nn.Linear(controls.shape[1], num_ws * w_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.3 / max(1, controls.shape[1]) ** 0.5)
        self.residual = nn.Parameter(torch.zeros(len(controls), num_ws, w_dim))
        self.num_ws, self.w_dim = num_ws, w_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pred = self.proj(self.controls[idx]).reshape(len(idx), self.num_ws, self.w_dim)
        return self.base + pred + self.residual[idx]

    def blended(self, i: torch.Tensor, j: torch.Tensor, pose: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """Latents between frames i and j: their controls' head pose blended by ``pose`` and jaw and expression
        by ``face`` (each [B] in [0, 1]; 0 is frame i's), their residuals by the mean of the two weights."""
        c = self.controls
        weight = face[:, None].repeat(1, c.shape[1])
        weight[:, :POSE_COLUMNS] = pose[:, None]
        mixed = torch.lerp(c[i], c[j], weight)
        pred = self.proj(mixed).reshape(len(i), self.num_ws, self.w_dim)
        return self.base + pred + torch.lerp(self.residual[i], self.residual[j], ((pose + face) / 2)[:, None, None])


def control_columns(yaw_pitch: np.ndarray, jaw: np.ndarray, expression: np.ndarray, n_expr: int = 16) -> np.ndarray:
    """The controls a frame's latent is predicted from: yaw, pitch, the jaw's opening and the first expressions."""
    return np.concatenate([yaw_pitch, jaw[:, :1], expression[:, :n_expr]], 1).astype(np.float64)


def standardized_controls(yaw_pitch: np.ndarray, jaw: np.ndarray, expression: np.ndarray, n_expr: int = 16):
    c = control_columns(yaw_pitch, jaw, expression, n_expr)
    std = c.std(0)
    return torch.from_numpy((c - c.mean(0)) / np.where(std > 1e-8, std, 1.0))


def inbetween_latents(latents: FrameLatents, idx: torch.Tensor, gap: int, gen: torch.Generator) -> torch.Tensor:
    """For each frame of ``idx``, the latents of a frame up to ``gap`` before it and one up to ``gap`` after it
    (fewer at the ends), blended at the frame's own time between theirs."""
    def offset() -> torch.Tensor:
        return torch.randint(1, gap + 1, idx.shape, generator=gen, device=gen.device).to(idx.device)

    times = latents.times
    before = (idx - offset()).clamp(min=0)
    after = (idx + offset()).clamp(max=len(times) - 1)
    at = (times[idx] - times[before]) / (times[after] - times[before]).clamp(min=1e-6)
    return torch.lerp(latents(before), latents(after), at.view(-1, 1, 1))


def reconstruction_loss(perceptual: PerceptualLoss, img: torch.Tensor, target: torch.Tensor,
                        detail: float = 0.0, detail_energy: float = 0.0) -> torch.Tensor:
    """L2 + the perceptual loss, + ``detail`` x the Laplacian-pyramid L1 and ``detail_energy`` x the
    fine-detail energy L1, each when > 0."""
    loss = (img - target).square().mean() + perceptual(img, target).mean()
    if detail > 0:
        loss = loss + detail * laplacian_l1(img, target).mean()
    if detail_energy > 0:
        loss = loss + detail_energy * detail_energy_l1(img, target).mean()
    return loss


def train_scratch_prior(frames: torch.Tensor, controls: torch.Tensor, preset: Preset, checkpoint: Path,
                        device, resume: bool, seed: int = 0, progress: bool = True,
                        frame_numbers: np.ndarray | None = None):
    """frames [N, 3, R, R] in [-1, 1], in time order; ``frame_numbers`` [N] their numbers in the video (the
    in-betweens' times; default 0..N-1). Returns (generator, latents module, last metrics)."""
    torch.manual_seed(seed)
    cfg = GeneratorConfig(resolution=preset.resolution, channels=preset.channels, z_dim=preset.w_dim,
                          w_dim=preset.w_dim, mapping_layers=preset.mapping_layers)
    G = Generator(cfg).to(device).train()
    latents = FrameLatents(controls, cfg.num_ws, cfg.w_dim,
                           None if frame_numbers is None else torch.from_numpy(np.asarray(frame_numbers))).to(device)
    perceptual = PerceptualLoss("msssim")
    opt_g = torch.optim.Adam(G.synthesis.parameters(), lr=preset.prior_lr, betas=(0.0, 0.99))
    opt_l = torch.optim.Adam(latents.parameters(), lr=preset.latent_lr)
    state = {"generator": G, "latents": latents, "opt_g": opt_g, "opt_l": opt_l}
    schedule = [(opt_g, preset.prior_lr), (opt_l, preset.latent_lr)]
    frames = frames.to(device)
    dtype = render_dtype(preset.prior_precision, device)
    n = len(frames)
    n_between = max(1, round(preset.prior_batch * preset.prior_inbetween)) if preset.prior_inbetween > 0 else 0
    D = None
    if preset.prior_adversarial > 0:
        D = Discriminator(DiscriminatorConfig(preset.resolution)).to(device).train()
        opt_d = torch.optim.Adam(D.parameters(), lr=preset.prior_lr, betas=(0.0, 0.99))
        state.update(discriminator=D, opt_d=opt_d)
        schedule.append((opt_d, preset.prior_lr))

    def draw(gen: torch.Generator, size: int) -> torch.Tensor:
        return torch.randint(n, (size,), generator=gen, device=gen.device).to(device)

    def step(i: int) -> dict[str, torch.Tensor]:
        decay = min(1.0, 2.0 * (1 - i / preset.prior_steps)) if preset.prior_steps else 1.0
        for opt, lr in schedule:
            for group in opt.param_groups:
                group["lr"] = lr * max(decay, 0.05)
        gen = step_generator(seed, i, device)
        idx = draw(gen, preset.prior_batch)
        w = latents(idx)
        if n_between:  # the first frames of the batch from two neighbours' latents
            w = torch.cat([inbetween_latents(latents, idx[:n_between], preset.prior_inbetween_gap, gen),
                           w[n_between:]])
        img = G.synthesis(w, noise_mode="const", dtype=dtype)
        rec = reconstruction_loss(perceptual, img, frames[idx], preset.prior_detail, preset.prior_detail_energy)
        loss = rec + preset.residual_weight * latents.residual[idx].square().mean()
        metrics = {"rec": rec.detach()}
        if D is not None:
            b = preset.prior_batch
            u = torch.rand(2, b, generator=gen, device=gen.device).to(device)
            fake = G.synthesis(latents.blended(draw(gen, b), draw(gen, b), u[0], u[1]).detach(),
                               noise_mode="const", dtype=dtype)
            real = diff_augment(frames[draw(gen, b)], gen)
            d_loss = discriminator_step(D, opt_d, real, diff_augment(fake.detach(), gen), preset.prior_r1)
            g_adv = generator_adversarial_loss(D, diff_augment(fake, gen))
            loss = loss + preset.prior_adversarial * g_adv
            metrics.update(d_loss=d_loss, g_adv=g_adv.detach())
        opt_g.zero_grad(set_to_none=True)
        opt_l.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_l.step()
        return {"loss": loss.detach(), **metrics}

    metrics = run_steps("prior (from scratch)", preset.prior_steps, step, state, checkpoint, preset.checkpoint_every,
                        resume, progress)
    G.eval().requires_grad_(False)
    with torch.no_grad():
        all_w = latents(torch.arange(len(frames), device=device))
        G.mapping.w_avg.copy_(all_w.mean(dim=(0, 1)))
    return G, latents.eval().requires_grad_(False), metrics
