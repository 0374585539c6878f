"""A small discriminator and differentiable augmentation for the from-scratch prior's adversarial term.

A prior learned from one short video sees a few hundred frames: a discriminator on so few images memorises
them unless every image it sees, real or rendered, goes through the same random differentiable augmentation
(Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training": colour, translation,
cutout). Its loss is the non-saturating logistic one with an R1 penalty on the real images."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    resolution: int
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one width per halving, the first at full resolution

    def __post_init__(self):
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {self.resolution}")


class Discriminator(nn.Module):
    """Strided convolutions down to 4x4 (the last width repeated when the resolution needs more halvings),
    then one logit per image."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        halvings = int(math.log2(cfg.resolution)) - 2
        widths = [cfg.channels[min(i, len(cfg.channels) - 1)] for i in range(halvings + 1)]
        layers = [nn.Conv2d(3, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.logit = nn.Linear(widths[-1] * 16, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(images).flatten(1)).squeeze(1)


def diff_augment(images: torch.Tensor, gen: torch.Generator, translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """Random brightness, saturation and contrast, a translation of up to ``translation`` of the size
    (zero-padded) and one square cutout of ``cutout`` of the size per image; differentiable in the images,
    drawn on ``gen``'s device."""
    n, _, h, w = images.shape

    def uniform(*shape):
        return torch.rand(shape, generator=gen, device=gen.device).to(images.device)

    x = images + (uniform(n, 1, 1, 1) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (uniform(n, 1, 1, 1) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform(n, 1, 1, 1) + 0.5) + mean
    # translation and cutout as one sampling grid and one mask: no per-image Python loop
    shift = (uniform(n, 2) * 2 - 1) * translation * 2  # grid units span 2 per image side
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    ys = torch.linspace(-1, 1, h, device=images.device).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, w)
    centre = uniform(n, 2) * 2 - 1  # the cutout's half side is ``cutout`` in grid units
    keep = ((ys - centre[:, 0, None, None]).abs() > cutout) | ((xs - centre[:, 1, None, None]).abs() > cutout)
    return x * keep.unsqueeze(1).to(x.dtype)


def discriminator_loss(D: Discriminator, real: torch.Tensor, fake: torch.Tensor, r1_gamma: float) -> torch.Tensor:
    """Non-saturating logistic loss of D on augmented real and rendered images, + R1 on the real ones."""
    real = real.detach().requires_grad_(r1_gamma > 0)
    real_logits = D(real)
    loss = F.softplus(-real_logits).mean() + F.softplus(D(fake.detach())).mean()
    if r1_gamma > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        loss = loss + r1_gamma / 2 * grad.square().sum((1, 2, 3)).mean()
    return loss


def discriminator_step(D: Discriminator, opt: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor,
                       r1_gamma: float) -> torch.Tensor:
    """One update of D on (augmented) real and rendered images; its loss, detached."""
    loss = discriminator_loss(D, real, fake, r1_gamma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def generator_adversarial_loss(D: Discriminator, fake: torch.Tensor) -> torch.Tensor:
    """The renders' non-saturating loss; its gradients reach the renders, never D's parameters."""
    trainable = [p for p in D.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        return F.softplus(-D(fake)).mean()
    finally:
        for p in trainable:
            p.requires_grad_(True)
