"""Load a StyleGAN2 generator from any supported checkpoint, into :class:`pvp.models.generator.Generator`."""
from __future__ import annotations

import zipfile
from pathlib import Path

from pvp.checkpoints import native, nvlabs, rosinality
from pvp.checkpoints.layout import CheckpointError
from pvp.models.generator import Generator

__all__ = ["CheckpointError", "load_generator", "save_generator", "detect_format"]

WHERE_TO_GET = (
    "the official files are NVlabs' ffhq.pkl (stylegan2-ada-pytorch, 'pretrained' downloads) or "
    "rosinality's stylegan2-ffhq-config-f.pt (stylegan2-pytorch README)")


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return "pvp"
    if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth"):
        return "rosinality"
    if head[:1] == b"\x80" or path.suffix == ".pkl":
        return "nvlabs"
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .pkl, .pt or .safetensors)")


def load_generator(path, device="cpu") -> Generator:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {WHERE_TO_GET}")
    loader = {"pvp": native.load, "rosinality": rosinality.load, "nvlabs": nvlabs.load}[detect_format(path)]
    return loader(path).to(device)


def save_generator(G: Generator, path) -> None:
    native.save(G, Path(path))
