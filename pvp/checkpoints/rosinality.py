"""rosinality/stylegan2-pytorch checkpoints (``{'g_ema': state_dict, 'latent_avg': [512]}``), as e4e and
most PyTorch ports use them, e.g. stylegan2-ffhq-config-f.pt."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from pvp.checkpoints.layout import CheckpointError, build_generator, check_shapes, expected_shapes, infer_config
from pvp.models.generator import Generator, GeneratorConfig, blur_filter

_LAYER_PARAMS = {  # rosinality sub-key -> (canonical sub-key, number of leading singleton dims)
    "conv.weight": ("weight", 1),
    "conv.modulation.weight": ("affine.weight", 0),
    "conv.modulation.bias": ("affine.bias", 0),
    "activate.bias": ("bias", 0),
    "noise.weight": ("noise_strength", -1),  # [1] <-> []
}
_TORGB_PARAMS = {
    "conv.weight": ("weight", 1),
    "conv.modulation.weight": ("affine.weight", 0),
    "conv.modulation.bias": ("affine.bias", 0),
    "bias": ("bias", -3),  # [1, 3, 1, 1] <-> [3]
}
BLUR_KERNEL = "blur kernel"  # rosinality stores its constant resampling kernels; they carry no weights


def _conv_name(index: int) -> str:
    return f"synthesis.b{2 ** (index // 2 + 3)}.conv{index % 2}"


def canonical_name(key: str) -> tuple[str, int] | None:
    """rosinality key -> (canonical key, leading-dims code) or None when it has no counterpart."""
    if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", key):
        return (f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}", 0) if int(m.group(1)) > 0 else None
    if key == "input.input":
        return "synthesis.b4.const", 1
    if m := re.fullmatch(r"noises\.noise_(\d+)", key):
        j = int(m.group(1))
        layer = "synthesis.b4.conv1" if j == 0 else _conv_name(j - 1)
        return f"{layer}.noise_const", 2
    if m := re.fullmatch(r"(conv1|convs\.(\d+))\.(.+)", key):
        layer = "synthesis.b4.conv1" if m.group(1) == "conv1" else _conv_name(int(m.group(2)))
        if m.group(3) == "conv.blur.kernel" and m.group(1) != "conv1" and int(m.group(2)) % 2 == 0:
            return BLUR_KERNEL, 0
        if m.group(3) in _LAYER_PARAMS:
            sub, lead = _LAYER_PARAMS[m.group(3)]
            return f"{layer}.{sub}", lead
    if m := re.fullmatch(r"(to_rgb1|to_rgbs\.(\d+))\.(.+)", key):
        block = "synthesis.b4" if m.group(1) == "to_rgb1" else f"synthesis.b{2 ** (int(m.group(2)) + 3)}"
        if m.group(3) == "upsample.kernel" and m.group(1) != "to_rgb1":
            return BLUR_KERNEL, 0
        if m.group(3) in _TORGB_PARAMS:
            sub, lead = _TORGB_PARAMS[m.group(3)]
            return f"{block}.torgb.{sub}", lead
    return None


def _file_shape(shape: tuple[int, ...], lead: int) -> tuple[int, ...]:
    if lead == -1:
        return (1,)
    if lead == -3:
        return (1, shape[0], 1, 1)
    return (1,) * lead + tuple(shape)


def _canonical_shape(shape: tuple[int, ...], lead: int) -> tuple[int, ...]:
    if lead == -1:
        return () if shape == (1,) else shape
    if lead == -3:
        return (shape[1],) if len(shape) == 4 and shape[0] == shape[2] == shape[3] == 1 else shape
    return shape[lead:] if shape[:lead] == (1,) * lead else shape


def rosinality_keys(cfg: GeneratorConfig) -> dict[str, str]:
    """canonical key -> rosinality key for a config, plus the constant kernels under their own names."""
    n_layers = 2 * (cfg.num_blocks - 1) + 1
    names = [f"style.{i + 1}.{p}" for i in range(cfg.mapping_layers) for p in ("weight", "bias")]
    names += ["input.input"] + [f"noises.noise_{j}" for j in range(n_layers)]
    layers = ["conv1"] + [f"convs.{i}" for i in range(n_layers - 1)]
    names += [f"{layer}.{p}" for layer in layers for p in _LAYER_PARAMS]
    rgbs = ["to_rgb1"] + [f"to_rgbs.{i}" for i in range(cfg.num_blocks - 1)]
    names += [f"{r}.{p}" for r in rgbs for p in _TORGB_PARAMS]
    return {canonical_name(n)[0]: n for n in names}


def _kernel_keys(cfg: GeneratorConfig) -> list[str]:
    return [k for i in range(cfg.num_blocks - 1)
            for k in (f"convs.{2 * i}.conv.blur.kernel", f"to_rgbs.{i}.upsample.kernel")]


def _latent_avg(value, w_dim: int, source: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 2 and bool((t == t[:1]).all()):
        t = t[0]  # e4e stores it repeated per W+ layer
    if tuple(t.shape) != (w_dim,):
        raise CheckpointError(f"{source}: latent_avg has shape {list(t.shape)}, expected [{w_dim}]")
    return t


def load(path: Path) -> Generator:
    source = str(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt, truncated or unsafe files
        raise CheckpointError(f"{source}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{source}: expected a rosinality checkpoint with a 'g_ema' state dict, found {found}")
    g_ema = ckpt["g_ema"]
    canonical: dict[str, torch.Tensor] = {}
    for key, t in g_ema.items():
        target = canonical_name(key)
        if target is not None and target[0] != BLUR_KERNEL:
            canonical[target[0]] = t.reshape(_canonical_shape(tuple(t.shape), target[1]))
    cfg = infer_config({k: tuple(t.shape) for k, t in canonical.items()}, source)
    names = rosinality_keys(cfg)
    expected = {names[k]: _file_shape(s, canonical_name(names[k])[1])
                for k, s in expected_shapes(cfg).items() if k != "mapping.w_avg"}
    expected.update({k: (4, 4) for k in _kernel_keys(cfg)})
    check_shapes({k: tuple(t.shape) for k, t in g_ema.items()}, expected, source)
    for key in _kernel_keys(cfg):
        if not torch.allclose(g_ema[key].float(), blur_filter() * 4):
            raise CheckpointError(f"{source}: {key} is not the [1,3,3,1] resampling kernel this generator uses")
    w_avg = _latent_avg(ckpt.get("latent_avg"), cfg.w_dim, source)
    G = build_generator(cfg, {**canonical, "mapping.w_avg": torch.zeros(cfg.w_dim) if w_avg is None else w_avg},
                        source)
    if w_avg is None:  # rosinality's own training checkpoints do not store it; generate.py estimates it too
        G.mapping.w_avg.copy_(G.estimate_w_avg())
    return G
