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

    def folded(self, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [in, out], bias [out]) in float32 with the layer's gains and ``gain`` folded in."""
        return (self.weight.float() * (self.weight_gain * gain)).t(), self.bias.float() * (self.bias_gain * gain)


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


@dataclass
class PreparedLayer:
    """One modulated convolution in the form synthesis runs it: weights in the compute dtype, its styles at
    ``styles[row, :, offset:offset + in_ch]`` and (conv layers) its output multiplier at ``mult[row, :, :out_ch]``
    of the stacked per-call tensors."""

    row: int
    offset: int
    in_ch: int
    out_ch: int
    weight: torch.Tensor  # conv: [O, I, 3, 3] (up: [I, O, 3, 3], the transposed convolution's layout); toRGB: [3, I]
    bias: torch.Tensor  # [O]; conv layers: times the activation gain
    up: bool = False
    blur: torch.Tensor | None = None  # up layers: the depthwise FIR [O, 1, 4, 4] (gain 4)
    noise: torch.Tensor | None = None  # gain * noise_strength * noise_const [R, R]
    noise_gain: torch.Tensor | None = None  # gain * noise_strength, for noise_mode='random'


@dataclass
class PreparedSynthesis:
    """Everything synthesis needs, derived once from the canonical parameters (see SynthesisNetwork.prepared).

    Row j of the stacked tensors belongs to w_j of W+: the style affines of every layer w_j drives side by side
    (one baddbmm for all styles), and the demodulation of w_j's convolution (one baddbmm + rsqrt for all)."""

    dtype: torch.dtype
    style_weight: torch.Tensor  # [J, w_dim, K] float32
    style_bias: torch.Tensor  # [J, 1, K]
    demod_weight: torch.Tensor  # [J, K, O]: sum over taps of weight^2 / gain^2 on the conv layer's style columns
    demod_eps: torch.Tensor  # [J, 1, O]: NVlabs' 1e-8 in the same scale
    layer_bias: torch.Tensor  # [J, 1, O]: gain * bias, float32 (divided by the multiplier at batch 1)
    const: torch.Tensor  # [1, C, 4, 4]
    blocks: list[tuple[list[PreparedLayer], PreparedLayer]]  # (conv layers, toRGB) per block
    image_blur: torch.Tensor  # [3, 1, 4, 4]: the skip upsampling as a depthwise transposed convolution
    conv_clamp: float | None
    version: tuple = ()


class _Cache(dict):
    """Prepared tensors per (dtype, memory format); a copy of the module starts without them."""

    def __deepcopy__(self, memo):
        return _Cache()


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool, conv_clamp):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("blur", blur_filter() * 4, persistent=False)  # on the device: no copy per call
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp

    def prepare(self, row: int, offset: int, dtype: torch.dtype, memory_format: torch.memory_format):
        """-> (the layer, its demodulation columns [I, O], eps [O], gain * bias [O]), all from the parameters.

        The demodulated output is gain * conv(x * s, W) * d = conv(x * s, c W) * m with
        m = rsqrt(s^2 . sum(c W)^2 / gain^2 + 1e-8 c^2 / gain^2): the leaky ReLU gain (LReLU(g z) = g LReLU(z))
        and a per-channel scale c folded in. c = 1 / (sqrt(fan_in) max|W|), NVlabs' fp16 normalisation, keeps
        half-precision products in range in every dtype."""
        w = self.weight.float()
        out_ch, in_ch = w.shape[:2]
        scale = 1.0 / (math.sqrt(w[0].numel()) * w.abs().amax(dim=[1, 2, 3]).clamp(min=1e-8))
        w = w * scale[:, None, None, None]
        g2 = LRELU_GAIN ** 2
        demod = (w.square().sum(dim=[2, 3]) / g2).t()
        eps = 1e-8 * scale.square() / g2
        bias = self.bias.float() * LRELU_GAIN
        noise_gain = self.noise_strength.float() * LRELU_GAIN
        if self.up:
            w = w.transpose(0, 1)
        blur = self.blur.to(dtype)[None, None].repeat(out_ch, 1, 1, 1) if self.up else None
        layer = PreparedLayer(row, offset, in_ch, out_ch, w.to(dtype, memory_format=memory_format), bias.to(dtype),
                              self.up, blur, (self.noise_const * noise_gain).to(dtype), noise_gain.to(dtype))
        return layer, demod, eps, bias


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, w_dim: int, conv_clamp, img_channels: int = 3):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_ch)
        self.conv_clamp = conv_clamp

    def prepare(self, row: int, offset: int, dtype: torch.dtype) -> PreparedLayer:
        """Not demodulated; its weight gain is folded into the style affine (see SynthesisNetwork.prepare)."""
        out_ch, in_ch = self.weight.shape[:2]
        return PreparedLayer(row, offset, in_ch, out_ch, self.weight.reshape(out_ch, in_ch).to(dtype),
                             self.bias.to(dtype))


class SynthesisBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, conv_clamp):
        super().__init__()
        if in_ch == 0:
            self.const = nn.Parameter(torch.randn(out_ch, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, resolution, True, conv_clamp)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, resolution, False, conv_clamp)
        self.torgb = ToRGB(out_ch, w_dim, conv_clamp)
        self.is_first = in_ch == 0
        self.num_conv = 1 if self.is_first else 2

    @property
    def convs(self) -> list[SynthesisLayer]:
        return [self.conv1] if self.is_first else [self.conv0, self.conv1]


def modulated_layer(x: torch.Tensor, layer: PreparedLayer, styles: torch.Tensor, mult: torch.Tensor,
                    conv_bias: torch.Tensor | None, noise_mode: str, clamp: float | None) -> torch.Tensor:
    """One demodulated convolution + noise + bias + leaky ReLU (+ clamp). At batch 1 the styles scale the
    weights (no pass over the activations) and the bias rides in the convolution as bias / m; larger batches
    scale the activations around one shared convolution (NVlabs' non-fused path)."""
    batch = styles.shape[1]
    s = styles[layer.row, :, layer.offset:layer.offset + layer.in_ch]
    bias = None if conv_bias is None else conv_bias[layer.row, 0, :layer.out_ch]
    if batch == 1:
        w = layer.weight * s.reshape((-1, 1, 1, 1) if layer.up else (1, -1, 1, 1))
    else:
        w = layer.weight
        x = x * s.reshape(batch, -1, 1, 1)
    if layer.up:  # transposed convolution, then the FIR of upfirdn2d(pad=1, gain=4) as one depthwise conv
        x = F.conv2d(F.conv_transpose2d(x, w, stride=2), layer.blur, bias, padding=1, groups=layer.out_ch)
    else:
        x = F.conv2d(x, w, bias, padding=1)
    m = mult[layer.row, :, :layer.out_ch].reshape(batch, -1, 1, 1)
    noise = layer.noise if noise_mode == "const" else None
    if noise_mode == "random":
        noise = torch.randn(batch, 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype) * layer.noise_gain
    x = x * m if noise is None else torch.addcmul(noise, x, m)
    if conv_bias is None:
        x = x + layer.bias.reshape(1, -1, 1, 1)
    x = F.leaky_relu(x, LRELU_SLOPE, inplace=True)
    return x.clamp(-clamp, clamp) if clamp is not None else x


def to_rgb(x: torch.Tensor, layer: PreparedLayer, styles: torch.Tensor, img: torch.Tensor | None,
           image_blur: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """img (upsampled) + toRGB(x): per-sample modulated 1x1 weights [B, 3, C] in one batched matrix product.
    Without a clamp the upsampled image and the bias ride in it as its additive term."""
    batch, ch, h, w = x.shape
    wmod = layer.weight * styles[layer.row, :, layer.offset:layer.offset + ch].unsqueeze(1)
    up = None
    if img is not None:  # upfirdn2d(up=2, pad=(2, 1), gain=4) as a depthwise transposed convolution
        up = F.conv_transpose2d(img, image_blur, layer.bias if clamp is None else None, stride=2, padding=1,
                                groups=img.shape[1])
    if clamp is None:
        base = layer.bias.reshape(-1, 1) if up is None else up.reshape(batch, up.shape[1], -1)
        return torch.baddbmm(base, wmod, x.reshape(batch, ch, -1)).reshape(batch, -1, h, w)
    y = torch.baddbmm(layer.bias.reshape(-1, 1), wmod, x.reshape(batch, ch, -1)).reshape(batch, -1, h, w)
    y = y.clamp(-clamp, clamp)
    return y if up is None else up + y


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.block_resolutions = cfg.block_resolutions
        prev = 0
        for res, ch in zip(cfg.block_resolutions, cfg.channels):
            setattr(self, f"b{res}", SynthesisBlock(prev, ch, cfg.w_dim, res, cfg.conv_clamp))
            prev = ch
        self.num_ws = cfg.num_ws
        self.conv_clamp = cfg.conv_clamp
        self.channels_last: bool | None = None  # None: channels_last on CUDA
        self._prepared = _Cache()
        self.register_buffer("image_blur", blur_filter() * 4, persistent=False)

    def prepare(self, dtype: torch.dtype, memory_format: torch.memory_format) -> PreparedSynthesis:
        """The derived tensors, computed from the parameters (differentiably when autograd records)."""
        styles: list[list[tuple]] = [[] for _ in range(self.num_ws)]
        demods: list[list[tuple]] = [[] for _ in range(self.num_ws)]
        blocks, row, const = [], 0, None
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            if block.is_first:
                const = block.const.to(dtype)[None].contiguous(memory_format=memory_format)
            convs = []
            for layer in block.convs:
                offset = sum(len(b) for _, b in styles[row])
                prepared, demod, eps, bias = layer.prepare(row, offset, dtype, memory_format)
                styles[row].append(layer.affine.folded())
                demods[row].append((demod, eps, bias))
                convs.append(prepared)
                row += 1
            offset = sum(len(b) for _, b in styles[row])
            styles[row].append(block.torgb.affine.folded(block.torgb.weight_gain))
            demods[row].append((None, None, None))
            blocks.append((convs, block.torgb.prepare(row, offset, dtype)))
        k = max(sum(len(b) for _, b in r) for r in styles)
        o = max(layer.out_ch for convs, _ in blocks for layer in convs)
        style_weight = torch.stack([F.pad(torch.cat([w for w, _ in r], 1), (0, k - sum(len(b) for _, b in r)))
                                    for r in styles])
        style_bias = torch.stack([F.pad(torch.cat([b for _, b in r]), (0, k - sum(len(b) for _, b in r)))
                                  for r in styles])[:, None]
        demod_weight, demod_eps, layer_bias = [], [], []
        for r, d in zip(styles, demods):
            cols = [dm if dm is not None else w.new_zeros(len(b), 0) for (w, b), (dm, _, _) in zip(r, d)]
            cols = [F.pad(c, (0, o - c.shape[1])) for c in cols]
            demod_weight.append(F.pad(torch.cat(cols), (0, 0, 0, k - sum(len(c) for c in cols))))
            eps = [e for _, e, _ in d if e is not None]
            bias = [b for _, _, b in d if b is not None]
            demod_eps.append(F.pad(eps[0], (0, o - len(eps[0])), value=1.0) if eps else r[0][1].new_ones(o))
            layer_bias.append(F.pad(bias[0], (0, o - len(bias[0]))) if bias else r[0][1].new_zeros(o))
        image_blur = self.image_blur.to(dtype)[None, None].repeat(3, 1, 1, 1)
        return PreparedSynthesis(dtype, style_weight, style_bias, torch.stack(demod_weight),
                                 torch.stack(demod_eps)[:, None], torch.stack(layer_bias)[:, None], const, blocks,
                                 image_blur, self.conv_clamp)

    def memory_format(self, device: torch.device) -> torch.memory_format:
        last = device.type == "cuda" if self.channels_last is None else self.channels_last
        return torch.channels_last if last else torch.contiguous_format

    def prepared(self, dtype: torch.dtype = torch.float32) -> PreparedSynthesis:
        """The derived tensors for ``dtype``: rebuilt on every call while autograd records gradients of any
        parameter or buffer (training: gradients reach the canonical tensors), otherwise cached until one of
        them changes (in-place updates bump a tensor's version: a trained noise buffer is never served
        stale; moving the module changes its storage)."""
        tensors = [*self.parameters(), *self.buffers()]
        memory_format = self.memory_format(tensors[0].device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.prepare(dtype, memory_format)
        version = tuple((t._version, t.data_ptr()) for t in tensors)
        hit = self._prepared.get((dtype, memory_format))
        if hit is None or hit.version != version:
            self._prepared.pop((dtype, memory_format), None)  # free the stale tensors before building new ones
            with torch.inference_mode(False), torch.no_grad():
                hit = self.prepare(dtype, memory_format)
            hit.version = version
            self._prepared[(dtype, memory_format)] = hit
        return hit

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", dtype: torch.dtype = torch.float32):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be [batch, {self.num_ws}, w_dim], got {list(ws.shape)}")
        p = self.prepared(dtype)
        styles = torch.baddbmm(p.style_bias, ws.to(torch.float32).transpose(0, 1), p.style_weight)
        mult = torch.baddbmm(p.demod_eps, styles.square(), p.demod_weight).rsqrt()
        conv_bias = (p.layer_bias / mult).to(dtype) if ws.shape[0] == 1 else None
        styles, mult = styles.to(dtype), mult.to(dtype)
        x, img = p.const, None
        for convs, rgb in p.blocks:
            for layer in convs:
                x = modulated_layer(x, layer, styles, mult, conv_bias, noise_mode, p.conv_clamp)
            img = to_rgb(x, rgb, styles, img, p.image_blur, p.conv_clamp)
        return img.to(torch.float32)


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
