"""Appearance edits (paper Eq. 4): W+ directions added with a strength on top of w_final.

Files users have: InterFaceGAN boundaries (.npy, 1x512 or num_ws x 512; e4e/PTI's age.pt, smile.pt as
torch tensors), GANSpace components (ffhq_pca.pt: {mean, comp [80, 1, 512], std [80]}, applied as
(component, first layer, last layer)). Every avatar can also discover principal directions of its own
latent space (``discover``), so editing works on from-scratch avatars too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pvp.avatar import Avatar, AvatarError
from pvp.models.mappers import EXPR_LAYERS


class EditError(ValueError):
    """An edit file that cannot be used with this avatar; the message names it."""


def _layers(spec: str | None, num_ws: int) -> slice:
    if not spec:
        return slice(0, num_ws)
    a, _, b = spec.partition(":")
    start, stop = int(a or 0), int(b or num_ws)
    if not 0 <= start < stop <= num_ws:
        raise EditError(f"--layers {spec}: must lie within 0:{num_ws}")
    return slice(start, stop)


def _read_array(path: Path):
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or unsafe files
        raise EditError(f"{path}: not a readable direction file ({e})") from None


def load_direction(path, num_ws: int, w_dim: int, component: int | None = None,
                   layers: str | None = None) -> torch.Tensor:
    """Any supported file -> a [num_ws, w_dim] direction (zero outside the chosen layers)."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{path}: no such file")
    data = _read_array(path)
    if isinstance(data, dict):
        if not {"comp", "std"} <= set(data):
            if "fs3" in str(path) or "S_mean_std" in str(path):
                raise EditError(f"{path}: StyleCLIP global directions live in StyleSpace, which pvp does not edit "
                                "yet; use W/W+ directions")
            raise EditError(f"{path}: a dict without GANSpace's 'comp' and 'std' (found {sorted(data)})")
        if component is None:
            raise EditError(f"{path}: a GANSpace file: choose a component with --component")
        comp, std = torch.as_tensor(data["comp"]), torch.as_tensor(data["std"])
        if not 0 <= component < len(comp):
            raise EditError(f"{path}: component {component} out of range (0..{len(comp) - 1})")
        vec = (comp[component].reshape(-1) * std[component]).float()
    else:
        vec = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data).float()
    vec = vec.reshape(-1, vec.shape[-1]) if vec.ndim > 1 else vec[None]
    if vec.shape[-1] != w_dim:
        raise EditError(f"{path}: a {vec.shape[-1]}-d direction; this avatar's latents are {w_dim}-d "
                        "(FFHQ directions fit avatars fitted on the FFHQ prior)")
    if vec.shape[0] not in (1, num_ws):
        raise EditError(f"{path}: {vec.shape[0]} layers; expected 1 or {num_ws}")
    direction = vec.expand(num_ws, w_dim).clone()
    keep = _layers(layers, num_ws)
    mask = torch.zeros(num_ws, 1)
    mask[keep] = 1
    return direction * mask


def add_edit(avatar_dir, name: str, direction: torch.Tensor, kind: str, source: str) -> None:
    if not name.replace("_", "").replace("-", "").isalnum():
        raise EditError(f"edit name {name!r}: use letters, digits, '-' and '_'")
    avatar = Avatar.load(avatar_dir)
    edits = {n: d for n, d in zip(avatar.edit_names, avatar.edit_directions)}
    edits[name] = direction
    avatar.meta.edits = [e for e in avatar.meta.edits if e["name"] != name] + [
        {"name": name, "kind": kind, "source": source, "min": -5.0, "max": 5.0, "default": 0.0}]
    Avatar(avatar.meta, avatar.generator, avatar.mappers, avatar.face_model, edits).save(avatar_dir)


def discover(avatar: Avatar, count: int = 8, samples: int = 4000, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Principal directions of the avatar's own latent space, on the layers the rig leaves alone
    (8 and up: colour, texture, lighting; all layers for generators of 8 layers or fewer), scaled to one
    standard deviation each: latents are sampled across the rig's ranges (random controls through the
    mappers) and the pivots."""
    gen = torch.Generator().manual_seed(seed)
    channels = avatar.meta.schema["channels"]
    lo = torch.tensor([c["min"] for c in channels])
    hi = torch.tensor([c["max"] for c in channels])
    ctrl = lo + (hi - lo) * torch.rand(samples, len(channels), generator=gen)
    with torch.no_grad():
        w = avatar.latents(ctrl).cpu()
        pivots = avatar.mappers.pose.pivots.cpu()
    first = EXPR_LAYERS if avatar.mappers.cfg.num_ws > EXPR_LAYERS else 0
    w = torch.cat([w, pivots])[:, first:]
    flat = (w - w.mean(0)).reshape(len(w), -1)
    if flat.abs().max() < 1e-8:
        raise AvatarError("this avatar's latents do not vary on the appearance layers; nothing to discover")
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    std = s / (len(flat) - 1) ** 0.5
    out = []
    for i in range(min(count, len(std))):
        d = torch.zeros(avatar.mappers.cfg.num_ws, avatar.mappers.cfg.w_dim)
        d[first:] = (vh[i] * std[i]).reshape(w.shape[1], w.shape[2])
        out.append((f"pc{i:02d}", d))
    return out
