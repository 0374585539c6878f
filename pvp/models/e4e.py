"""The e4e encoder (Encoder4Editing, IR-SE50 + gradual style blocks) that loads the official
e4e_ffhq_encode.pt ({'state_dict': encoder.* and decoder.*, 'opts', 'latent_avg' [18, 512]})."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pvp.checkpoints.layout import CheckpointError
from pvp.models.irse import input_layer, ir_se50_body, load_checked, read_weights

INPUT_SIZE = 256
COARSE, MIDDLE = 3, 7  # W+ layers from the 16x16, 32x32 and 64x64 feature maps
WHERE = "e4e_ffhq_encode.pt comes from the encoder4editing README (omertov/encoder4editing)"


class EqualLinear(nn.Module):
    """rosinality's EqualLinear without activation, lr_mul 1 (weights scaled by 1/sqrt(fan_in))."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    def __init__(self, channels: int, spatial: int):
        super().__init__()
        layers = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(channels, channels)
        self.channels = channels

    def forward(self, x):
        return self.linear(self.convs(x).reshape(-1, self.channels))


class Encoder4Editing(nn.Module):
    def __init__(self, num_ws: int = 18):
        super().__init__()
        self.input_layer = input_layer()
        self.body = ir_se50_body()
        spatial = [16] * COARSE + [32] * (MIDDLE - COARSE) + [64] * (num_ws - MIDDLE)
        self.styles = nn.ModuleList(GradualStyleBlock(512, s) for s in spatial)
        self.latlayer1 = nn.Conv2d(256, 512, 1)
        self.latlayer2 = nn.Conv2d(128, 512, 1)
        self.num_ws = num_ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 256, 256] in [-1, 1] -> W+ offsets [B, num_ws, 512] (add the latent average)."""
        x = self.input_layer(x)
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == 6:
                c1 = x
            elif i == 20:
                c2 = x
        c3 = x
        p2 = F.interpolate(c3, size=c2.shape[2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        p1 = F.interpolate(p2, size=c1.shape[2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        w0 = self.styles[0](c3)
        deltas = [torch.zeros_like(w0)]
        for i in range(1, self.num_ws):
            deltas.append(self.styles[i](c3 if i < COARSE else p2 if i < MIDDLE else p1))
        return w0[:, None] + torch.stack(deltas, 1)


def load_e4e(path, device="cpu") -> tuple[Encoder4Editing, torch.Tensor]:
    path = Path(path)
    ckpt = read_weights(path, "e4e", WHERE)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: expected {{'state_dict', 'opts', 'latent_avg'}}; {WHERE}")
    encoder_state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    num_ws = 1 + max((int(k.split(".")[1]) for k in encoder_state if k.startswith("styles.")), default=17)
    enc = Encoder4Editing(num_ws)
    load_checked(enc, encoder_state, f"{path} (encoder.*)", "an e4e encoder")
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is None:
        raise CheckpointError(f"{path}: no latent_avg (e4e adds its codes to it)")
    latent_avg = torch.as_tensor(latent_avg).float()
    if latent_avg.ndim == 1:
        latent_avg = latent_avg[None].repeat(num_ws, 1)
    return enc.eval().requires_grad_(False).to(device), latent_avg.to(device)


def encode_pivots(path, targets: torch.Tensor, G, device, batch: int = 8) -> torch.Tensor:
    """targets [K, 3, R, R] in [-1, 1] -> W+ [K, num_ws, w_dim] for generator G."""
    enc, latent_avg = load_e4e(path, device)
    if enc.num_ws != G.num_ws:
        raise CheckpointError(f"{path}: encodes {enc.num_ws} W+ layers, the prior has {G.num_ws}")
    out = []
    with torch.no_grad():
        for i in range(0, len(targets), batch):
            x = F.interpolate(targets[i:i + batch].to(device), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              antialias=True, align_corners=False)
            out.append(enc(x) + latent_avg)
    return torch.cat(out)
