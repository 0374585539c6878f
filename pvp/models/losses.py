"""Image losses: LPIPS (the official package, its backbone's ImageNet weights from a file the user gives)
and the documented fallback for presets that run without downloaded weights (L2 + multi-scale SSIM).

All take images in [-1, 1], NCHW.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth",
            "torchvision's VGG16 ImageNet weights (download.pytorch.org/models/vgg16-397923af.pth)"),
    "alex": ("alexnet-owt-7be5be79.pth",
             "torchvision's AlexNet ImageNet weights (download.pytorch.org/models/alexnet-owt-7be5be79.pth)"),
}


class MissingWeights(FileNotFoundError):
    """A weight file a preset needs is absent; the message names it and where users get it."""


def lpips_model(net: str, backbone_file: str | Path | None) -> nn.Module:
    """The official LPIPS (linear layers v0.1 from the wheel), its backbone loaded from ``backbone_file``."""
    import lpips

    name, source = BACKBONE_FILES[net]
    if backbone_file is None or not Path(backbone_file).is_file():
        raise MissingWeights(f"LPIPS ({net}) needs {name}: {backbone_file or 'no file given'} not found; it is "
                             f"{source}; pass it with --{net if net == 'vgg' else 'alex'}")
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(backbone_file, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    target = {}
    for slice_name, block in model.net.named_children():
        for idx, layer in block.named_children():
            for pname in ("weight", "bias"):
                if hasattr(layer, pname) and getattr(layer, pname) is not None:
                    key = f"{idx}.{pname}"
                    if key not in features:
                        raise MissingWeights(f"{backbone_file}: no features.{key}; is this {name}?")
                    target[f"{slice_name}.{key}"] = features[key]
    model.net.load_state_dict(target, strict=True)
    return model.eval().requires_grad_(False)


def _gaussian_window(size: int, sigma: float, device, dtype):
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_maps(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(luminance*contrast*structure, contrast*structure) maps [B, C, H-window+1, W-window+1], images in [0, 1]."""
    c = a.shape[1]
    w = _gaussian_window(window, 1.5, a.device, a.dtype).repeat(c, 1, 1, 1)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return lum * cs, cs


def ssim_terms(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image means of the SSIM maps for images in [0, 1]."""
    full, cs = ssim_maps(a, b, window)
    return full.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per image, inputs in [-1, 1]; ``mask`` [B, 1, H, W] in {0, 1} averages the map inside it."""
    if mask is None:
        return ssim_terms((a + 1) / 2, (b + 1) / 2)[0]
    full, _ = ssim_maps((a + 1) / 2, (b + 1) / 2)
    m = mask[..., 3:3 + full.shape[-2], 3:3 + full.shape[-1]].expand_as(full)
    return (full * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int | None = None) -> torch.Tensor:
    """Multi-scale SSIM per image, inputs in [-1, 1]; as many scales (up to 5) as the size allows
    with a 7-pixel window."""
    n = scales or max(1, min(5, int(math.log2(min(a.shape[-2:]) / 7)) + 1))
    weights = [w / sum(MS_SSIM_WEIGHTS[:n]) for w in MS_SSIM_WEIGHTS[:n]]  # numbers: no copy to a GPU per call
    x, y = (a + 1) / 2, (b + 1) / 2
    result = torch.ones(a.shape[0], device=a.device, dtype=a.dtype)
    for i in range(n):
        full, cs = ssim_terms(x, y)
        term = full if i == n - 1 else cs
        result = result * term.clamp(min=1e-6) ** weights[i]
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def laplacian_l1(a: torch.Tensor, b: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Per image, the mean absolute difference in each band of a Laplacian pyramid (the finest first), summed
    with the coarse rest's: fine detail, which L2 and MS-SSIM weigh least, weighs as much as the coarse
    shapes (the GLO paper's Lap1 loss, equal band weights). The pyramid is linear: that of a - b."""
    diff, total = a - b, a.new_zeros(a.shape[0])
    for _ in range(levels):
        if min(diff.shape[-2:]) < 2:
            break
        low = F.avg_pool2d(diff, 2)
        total = total + (diff - F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)).abs().mean(
            (1, 2, 3))
        diff = low
    return total + diff.abs().mean((1, 2, 3))


def fine_detail_energy(img: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """[B, 1, H/cell, W/cell]: the RMS of the finest band (a 4-neighbour Laplacian of the grey levels) over
    each cell x cell patch — how much pixel-level detail an image has where, whatever its exact position."""
    grey = F.pad(img.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    lap = (grey[..., :-2, 1:-1] + grey[..., 2:, 1:-1] + grey[..., 1:-1, :-2] + grey[..., 1:-1, 2:]
           - 4 * grey[..., 1:-1, 1:-1])
    return F.avg_pool2d(lap.square(), cell).add(1e-8).sqrt()


def detail_energy_l1(a: torch.Tensor, b: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """Per image, the mean absolute difference of the two images' fine-detail energy (``fine_detail_energy``):
    a render with the right amount of pixel-level detail in each patch scores as well as one with it exactly
    in place, so unlike L2 (whose best guess at uncertain detail is none: blur) it asks for detail itself."""
    return (fine_detail_energy(a, cell) - fine_detail_energy(b, cell)).abs().mean((1, 2, 3))


class PerceptualLoss(nn.Module):
    """'lpips-vgg' / 'lpips-alex': LPIPS at up to 512 px (antialiased downsampling above it, as PVP's code);
    'msssim': the fallback without downloaded weights, 1 - MS-SSIM (L2 is added by the callers)."""

    def __init__(self, kind: str, vgg: str | Path | None = None, alex: str | Path | None = None):
        super().__init__()
        self.kind = kind
        if kind == "lpips-vgg":
            self.lpips = lpips_model("vgg", vgg)
        elif kind == "lpips-alex":
            self.lpips = lpips_model("alex", alex)
        elif kind != "msssim":
            raise ValueError(f"unknown perceptual loss {kind!r} (lpips-vgg, lpips-alex or msssim)")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image loss [B]."""
        if self.kind == "msssim":
            return 1 - ms_ssim(a, b)
        if a.shape[-1] > 512:
            a = F.interpolate(a, size=(512, 512), mode="bilinear", antialias=True, align_corners=False)
            b = F.interpolate(b, size=(512, 512), mode="bilinear", antialias=True, align_corners=False)
        return self.lpips(a, b, normalize=False).flatten()


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image for images in [-1, 1] (peak-to-peak 2); ``mask`` [B, 1, H, W] restricts it."""
    if mask is None:
        mse = (a - b).square().flatten(1).mean(1)
    else:
        m = mask.expand_as(a)
        mse = ((a - b).square() * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))
