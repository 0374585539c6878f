"""pvp's own generator format: ``NAME.safetensors`` (canonical tensors) with its config in the file's
metadata, so one file is the whole generator and loading never unpickles anything."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pvp.checkpoints.layout import CheckpointError, build_generator
from pvp.models.generator import Generator, GeneratorConfig
from pvp_contract.atomic import atomic_path

FORMAT = "pvp.generator"
VERSION = 1


def save(G: Generator, path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(G.cfg.to_json())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: Path) -> Generator:
    source = str(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{source}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a pvp generator (metadata format is {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{source}: written by a newer pvp (generator format {meta['version']}, "
                              f"this pvp reads up to {VERSION})")
    try:
        cfg = GeneratorConfig.from_json(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: bad generator config in the metadata: {e}") from None
    return build_generator(cfg, tensors, source)
