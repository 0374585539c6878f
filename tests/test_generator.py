import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pvp.models.generator import Generator, GeneratorConfig, default_channels, to_uint8, z_from_seed
from tests.official_layouts import FILTER_2D, random_generator


def _fir(x, f, pad, gain):
    c = x.shape[1]
    x = F.pad(x, [pad, pad, pad, pad])
    return F.conv2d(x, (f * gain).flip([0, 1])[None, None].repeat(c, 1, 1, 1), groups=c)


def _zero_insert(x):
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, 2 * h - 1, 2 * w - 1)
    out[:, :, ::2, ::2] = x
    return out


def reference_synthesis(G: Generator, ws: torch.Tensor, noise_mode="const") -> torch.Tensor:
    """An independent float64 formulation: per-sample (fused) modulated weights in a grouped convolution,
    transposed convolution written as zero insertion + full convolution, skip upsampling as explicit
    zero insertion + FIR."""
    sd = {k: v.double() for k, v in G.state_dict().items()}
    ws = ws.double()
    B = ws.shape[0]

    def affine(prefix, w):
        W, b = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
        return w @ (W / math.sqrt(W.shape[1])).t() + b

    def modconv(x, prefix, w, up, demod=True, gain=1.0):
        weight = sd[f"{prefix}.weight"]
        s = affine(f"{prefix}.affine", w) * gain
        wt = weight[None] * s[:, None, :, None, None]
        if demod:
            wt = wt * (wt.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        o, i, k = weight.shape[0], weight.shape[1], weight.shape[2]
        x = x.reshape(1, B * i, *x.shape[2:])
        if up:
            x = F.pad(_zero_insert(x), [k - 1] * 4)
            x = F.conv2d(x, wt.flip([3, 4]).reshape(B * o, i, k, k), groups=B)
            x = _fir(x, FILTER_2D.double(), 1, 4.0)
        else:
            x = F.conv2d(x, wt.reshape(B * o, i, k, k), padding=k // 2, groups=B)
        return x.reshape(B, o, *x.shape[2:])

    def layer(x, prefix, w, up):
        x = modconv(x, prefix, w, up)
        if noise_mode == "const":
            x = x + sd[f"{prefix}.noise_const"] * sd[f"{prefix}.noise_strength"]
        x = F.leaky_relu(x + sd[f"{prefix}.bias"][None, :, None, None], 0.2) * math.sqrt(2)
        clamp = G.cfg.conv_clamp
        return x.clamp(-clamp, clamp) if clamp is not None else x

    img = None
    idx = 0
    for res in G.cfg.block_resolutions:
        b = f"synthesis.b{res}"
        if res == 4:
            x = sd[f"{b}.const"][None].repeat(B, 1, 1, 1)
            x = layer(x, f"{b}.conv1", ws[:, 0], False)
            idx = 1
        else:
            x = layer(x, f"{b}.conv0", ws[:, idx], True)
            x = layer(x, f"{b}.conv1", ws[:, idx + 1], False)
            idx += 2
        ch = x.shape[1]
        y = modconv(x, f"{b}.torgb", ws[:, idx], False, demod=False, gain=1 / math.sqrt(ch))
        y = y + sd[f"{b}.torgb.bias"][None, :, None, None]
        if G.cfg.conv_clamp is not None:
            y = y.clamp(-G.cfg.conv_clamp, G.cfg.conv_clamp)
        img = y if img is None else reference_upsample(img) + y
    return img


def reference_upsample(img):
    """upfirdn2d(up=2, pad=(2, 1), gain=4) written out: zero insertion to 2H, pad 2/1, FIR 4x4."""
    b, c, h, w = img.shape
    u = img.new_zeros(b, c, 2 * h, 2 * w)
    u[:, :, ::2, ::2] = img
    u = F.pad(u, [2, 1, 2, 1])
    return F.conv2d(u, (FILTER_2D.double() * 4).flip([0, 1])[None, None].repeat(c, 1, 1, 1), groups=c)


@pytest.mark.parametrize("conv_clamp", [None, 0.5])
def test_synthesis_matches_independent_reference(conv_clamp):
    G = random_generator(resolution=32, channels=(24, 20, 16, 12), w_dim=16, conv_clamp=conv_clamp)
    ws = torch.randn(3, G.num_ws, 16)
    ours = G.synthesis(ws).double()
    ref = reference_synthesis(G, ws)
    assert ours.shape == (3, 3, 32, 32)
    assert (ours - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


def test_noise_modes():
    G = random_generator(resolution=16)
    ws = torch.randn(2, G.num_ws, 32)
    const = G.synthesis(ws, noise_mode="const")
    assert torch.equal(const, G.synthesis(ws, noise_mode="const"))
    assert not torch.allclose(const, G.synthesis(ws, noise_mode="none"))
    assert not torch.allclose(G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random"))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="bogus")


@pytest.mark.parametrize("resolution", [16, 64, 256, 1024])
def test_any_resolution_and_width(resolution):
    cfg = GeneratorConfig(resolution=resolution, channels=(8,) * GeneratorConfig(resolution).num_blocks,
                          z_dim=8, w_dim=8, mapping_layers=2)
    G = Generator(cfg).eval()
    assert G.num_ws == 2 * int(math.log2(resolution)) - 2
    with torch.no_grad():
        img = G(torch.randn(1, 8))
    assert img.shape == (1, 3, resolution, resolution) and torch.isfinite(img).all()


def test_config_f_widths_and_validation():
    assert default_channels(1024) == (512, 512, 512, 512, 512, 256, 128, 64, 32)
    assert GeneratorConfig(1024).num_ws == 18
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig(100)
    with pytest.raises(ValueError, match="channels needs 4 widths"):
        GeneratorConfig(32, channels=(8, 8))
    cfg = GeneratorConfig(32, channels=(8, 8, 4, 4), conv_clamp=256.0)
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg


def test_truncation_pulls_towards_w_avg():
    G = random_generator(resolution=16)
    z = torch.randn(4, 32)
    w = G.map_z(z)
    assert torch.allclose(G.map_z(z, truncation_psi=0.0), G.mapping.w_avg.expand_as(w))
    half = G.map_z(z, truncation_psi=0.5)
    assert torch.allclose(half, (w + G.mapping.w_avg) / 2, atol=1e-6)


def test_bfloat16_close_to_float32():
    G = random_generator(resolution=32)
    ws = torch.randn(2, G.num_ws, 32)
    ref = G.synthesis(ws)
    low = G.synthesis(ws, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert (low - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_seed_and_uint8_follow_nvlabs_generate():
    z = z_from_seed(42, 512)
    assert z.dtype == torch.float64
    assert np.array_equal(z.numpy(), np.random.RandomState(42).randn(1, 512))
    img = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    assert to_uint8(img)[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]
