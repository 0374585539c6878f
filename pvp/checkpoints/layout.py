"""The generator's canonical tensor layout: expected names and shapes, config inference, and the check
that names every missing, unexpected and mis-shaped tensor of a checkpoint."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

import torch

from pvp.models.generator import Generator, GeneratorConfig


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and the problem."""


def expected_shapes(cfg: GeneratorConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for a config (the state dict of :class:`Generator`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
    for i in range(cfg.mapping_layers):
        shapes[f"mapping.fc{i}.weight"] = (dims[i + 1], dims[i])
        shapes[f"mapping.fc{i}.bias"] = (dims[i + 1],)
    shapes["mapping.w_avg"] = (cfg.w_dim,)
    prev = 0
    for res, ch in zip(cfg.block_resolutions, cfg.channels):
        b = f"synthesis.b{res}"
        if prev == 0:
            shapes[f"{b}.const"] = (ch, res, res)
        layers = [("conv1", ch)] if prev == 0 else [("conv0", prev), ("conv1", ch)]
        for name, in_ch in layers:
            shapes[f"{b}.{name}.weight"] = (ch, in_ch, 3, 3)
            shapes[f"{b}.{name}.bias"] = (ch,)
            shapes[f"{b}.{name}.noise_strength"] = ()
            shapes[f"{b}.{name}.noise_const"] = (res, res)
            shapes[f"{b}.{name}.affine.weight"] = (in_ch, cfg.w_dim)
            shapes[f"{b}.{name}.affine.bias"] = (in_ch,)
        shapes[f"{b}.torgb.weight"] = (3, ch, 1, 1)
        shapes[f"{b}.torgb.bias"] = (3,)
        shapes[f"{b}.torgb.affine.weight"] = (ch, cfg.w_dim)
        shapes[f"{b}.torgb.affine.bias"] = (ch,)
        prev = ch
    return shapes


def _most_common(values: list[int], what: str, source: str) -> int:
    if not values:
        raise CheckpointError(f"{source}: cannot tell the {what}: no tensor that defines it was found")
    counts = Counter(values).most_common()
    best = max(c for _, c in counts)
    return max(v for v, c in counts if c == best)


def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str, **fixed) -> GeneratorConfig:
    """Infer a config from canonical names and shapes by majority over every tensor that implies each
    value, so that one mis-shaped tensor is reported as such instead of changing the architecture."""
    block_res = [int(m.group(1)) for k in shapes if (m := re.match(r"synthesis\.b(\d+)\.", k))]
    present = set(block_res)
    resolution = 2  # the largest resolution whose blocks from 4x4 up are all there; stray keys beyond it are
    while resolution * 2 in present:  # reported as unexpected instead of defining the architecture
        resolution *= 2
    if resolution < 4:
        raise CheckpointError(f"{source}: no synthesis blocks found; is this a StyleGAN2 generator?")
    fc = [int(m.group(1)) for k in shapes if (m := re.match(r"mapping\.fc(\d+)\.weight$", k))]
    votes: dict[int, list[int]] = {r: [] for r in (2**i for i in range(2, resolution.bit_length()))}
    w_dims: list[int] = []
    for k, s in shapes.items():
        m = re.match(r"synthesis\.b(\d+)\.(\w+)\.(\w+)(?:\.(\w+))?$", k)
        if k == "synthesis.b4.const" and len(s) == 3:
            votes[4].append(s[0])
        if not m or int(m.group(1)) not in votes:
            continue
        res, layer, param, sub = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if param == "weight" and sub is None and len(s) == 4:
            if layer in ("conv0", "conv1"):
                votes[res].append(s[0])
            if layer == "conv1" or layer == "torgb":
                votes[res].append(s[1])
            if layer == "conv0" and res // 2 in votes:
                votes[res // 2].append(s[1])
        if param == "affine" and sub == "weight" and len(s) == 2:
            w_dims.append(s[1])
    channels = tuple(_most_common(votes[r], f"channel width at {r}x{r}", source) for r in sorted(votes))
    z_dim = shapes.get("mapping.fc0.weight", (0, 0))
    cfg = dict(
        resolution=resolution, channels=channels,
        z_dim=z_dim[1] if len(z_dim) == 2 else 0,
        w_dim=_most_common(w_dims, "latent (w) width", source),
        mapping_layers=max(fc) + 1 if fc else 0,
    )
    cfg.update(fixed)
    try:
        return GeneratorConfig(**cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str,
                 what: str = "a StyleGAN2 generator") -> None:
    """Raise one error that lists every missing, unexpected and mis-shaped tensor (by the file's names)."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(f"{k}: expected {list(expected[k])}, found {list(found[k])}"
                   for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"{source}: the tensors do not match {what}"]
        if missing:
            lines.append("missing: " + ", ".join(missing))
        if unexpected:
            lines.append("unexpected: " + ", ".join(unexpected))
        if wrong:
            lines.append("wrong shape: " + "; ".join(wrong))
        raise CheckpointError("\n  ".join(lines))


def build_generator(cfg: GeneratorConfig, tensors: Mapping[str, torch.Tensor], source: str) -> Generator:
    """A generator with exactly these canonical tensors (already checked)."""
    check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, expected_shapes(cfg), source)
    G = Generator(cfg)
    G.load_state_dict({k: v.detach().to(torch.float32) for k, v in tensors.items()}, strict=True)
    return G.eval().requires_grad_(False)
