"""StyleGAN2 generator (config-f family) in pure PyTorch.

Parameter names follow NVlabs' stylegan2-ada-pytorch ``G_ema`` state dict (without the constant
``resample_filter`` buffers), so the official checkpoints map onto it one to one; the loaders live
in :mod:`pvp.checkpoints`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
NOISE_MODES = ("const", "random", "none")


def default_channels(resolution: int, channel_base: int = 32768, channel_max: int = 512) -> tuple[int, ...]:
    """Per-block widths from 4x4 up to ``resolution``, NVlabs' rule (config-f: base 32768, max 512)."""
    return tuple(min(channel_base // (2**i), channel_max) for i in range(2, int(math.log2(resolution)) + 1))


@dataclass(frozen=True)
class GeneratorConfig:
    resolution: int
    channels: tuple[int, ...] = field(default=())  # one width per block, 4x4 first; () = config-f widths
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    conv_clamp: float | None = None  # NVlabs' ffhq.pkl uses 256: it changes the output, so it is kept
    num_fp16_res: int = 0  # how many of the highest resolutions the checkpoint's authors ran in fp16

    def __post_init__(self):
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if not self.channels:
            object.__setattr__(self, "channels", default_channels(self.resolution))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != self.num_blocks:
            raise ValueError(
                f"channels needs {self.num_blocks} widths (4x4 to {self.resolution}x{self.resolution}), "
                f"got {len(self.channels)}")
        if any(c <= 0 for c in self.channels):
            raise ValueError(f"channel widths must be positive, got {self.channels}")

    @property
    def num_blocks(self) -> int:
        return int(math.log2(self.resolution)) - 1

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        return tuple(2 ** (i + 2) for i in range(self.num_blocks))

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GeneratorConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator config fields: {sorted(unknown)}")
        return cls(**{**d, "channels": tuple(d.get("channels", ()))})


def blur_filter(device=None, dtype=torch.float32) -> torch.Tensor:
    taps = torch.tensor(BLUR_TAPS, device=device, dtype=dtype)
    f = taps[:, None] * taps[None, :]
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0), gain: float = 1.0):
    """Zero-insertion upsampling, padding and a per-channel FIR filter (the reference upfirdn2d)."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    kernel = (f * gain).flip([0, 1]).to(x.dtype)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, kernel, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return upfirdn2d(x, f, up=2, pad=(2, 1), gain=4.0)


def bias_lrelu(x: torch.Tensor, bias: torch.Tensor, clamp: float | None) -> torch.Tensor:
    x = F.leaky_relu(x + bias.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2))), LRELU_SLOPE) * LRELU_GAIN
    return x.clamp(-clamp, clamp) if clamp is not None else x


class FullyConnected(nn.Module):
    """Equalized-learning-rate linear layer (stored weights are scaled at run time)."""

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0, bias_init: float = 0.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation:
            return bias_lrelu(x @ w.t(), b, None)
        return torch.addmm(b.unsqueeze(0), x, w.t())


class MappingNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], cfg.mapping_lr_multiplier, activation=True))
        self.num_layers = cfg.mapping_layers
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.to(torch.float32)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


def modulated_conv2d(x, weight, styles, demodulate: bool, up: bool, f: torch.Tensor | None):
    """Modulate by scaling activations (one shared convolution for the whole batch), then demodulate."""
    batch, in_ch = styles.shape
    out_ch, _, kh, kw = weight.shape
    weight = weight.to(x.dtype)
    styles = styles.to(x.dtype)
    if x.dtype == torch.float16 and demodulate:
        # The scale cancels under demodulation; it only keeps fp16 products in range.
        weight = weight * (1.0 / math.sqrt(in_ch * kh * kw) / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    x = x * styles.reshape(batch, in_ch, 1, 1)
    if up:
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        x = upfirdn2d(x, f, pad=(1, 1), gain=4.0)
    else:
        x = F.conv2d(x, weight, padding=kh // 2)
    if demodulate:
        w = weight.unsqueeze(0).float() * styles.float().reshape(batch, 1, in_ch, 1, 1)
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        x = x * dcoefs.to(x.dtype).reshape(batch, out_ch, 1, 1)
    return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool, conv_clamp):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", blur_filter(), persistent=False)
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp

    def forward(self, x, w, noise_mode: str):
        x = modulated_conv2d(x, self.weight, self.affine(w.to(torch.float32)), True, self.up, self.resample_filter)
        if noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        return bias_lrelu(x, self.bias, self.conv_clamp)


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, w_dim: int, conv_clamp, img_channels: int = 3):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_ch)
        self.conv_clamp = conv_clamp

    def forward(self, x, w):
        styles = self.affine(w.to(torch.float32)) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, False, False, None)
        x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x


class SynthesisBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, conv_clamp):
        super().__init__()
        if in_ch == 0:
            self.const = nn.Parameter(torch.randn(out_ch, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, resolution, True, conv_clamp)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, resolution, False, conv_clamp)
        self.torgb = ToRGB(out_ch, w_dim, conv_clamp)
        self.register_buffer("resample_filter", blur_filter(), persistent=False)
        self.is_first = in_ch == 0
        self.num_conv = 1 if self.is_first else 2

    def forward(self, x, img, ws, noise_mode: str, dtype: torch.dtype):
        """ws: [B, num_conv + 1, w_dim]; the last one drives toRGB and is shared with the next block."""
        if self.is_first:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise_mode)
        else:
            x = self.conv0(x.to(dtype), ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv]).to(torch.float32)
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.block_resolutions = cfg.block_resolutions
        prev = 0
        for res, ch in zip(cfg.block_resolutions, cfg.channels):
            setattr(self, f"b{res}", SynthesisBlock(prev, ch, cfg.w_dim, res, cfg.conv_clamp))
            prev = ch
        self.num_ws = cfg.num_ws

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", dtype: torch.dtype = torch.float32):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be [batch, {self.num_ws}, w_dim], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws[:, w_idx:w_idx + block.num_conv + 1], noise_mode, dtype)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """z -> mapping -> w (broadcast to W+) -> synthesis -> image in [-1, 1], NCHW float32."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    def truncate(self, w: torch.Tensor, psi: float) -> torch.Tensor:
        return w if psi == 1 else self.mapping.w_avg.to(w.dtype).lerp(w, psi)

    def map_z(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z [B, z_dim] -> W+ [B, num_ws, w_dim]."""
        w = self.truncate(self.mapping(z), truncation_psi)
        return w.unsqueeze(1).repeat(1, self.num_ws, 1)

    def forward(self, z, truncation_psi: float = 1.0, noise_mode: str = "const", dtype=torch.float32):
        return self.synthesis(self.map_z(z, truncation_psi), noise_mode=noise_mode, dtype=dtype)

    @torch.no_grad()
    def estimate_w_avg(self, num_samples: int = 4096, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, self.cfg.z_dim, generator=gen).to(self.mapping.w_avg.device)
        return self.mapping(z).mean(dim=0)


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """NCHW in [-1, 1] -> NHWC uint8, exactly as NVlabs' generate.py converts."""
    return (img.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def z_from_seed(seed: int, z_dim: int = 512) -> torch.Tensor:
    """The latent NVlabs' generate.py draws for a seed (float64, as it is there)."""
    import numpy as np

    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim))
