"""A folder of rendered frames: file names, and the manifest that says what each file shows.

Shared by every timeline render (the extension's fast render through the server, ``pvp render`` in one
process or on a Ray cluster): a frame file is written under a temporary name and renamed
(:mod:`pvp_contract.atomic`), and the manifest (``pvp_frames.json``) maps each frame number to the key of
what it shows (controls, edits, size, avatar). A frame already on disk is kept only when its key is the one
asked for now, so a resumed render renders exactly the frames that are missing or changed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pvp_contract.atomic import write_text
from pvp_contract.client import quantise

MANIFEST = "pvp_frames.json"


def frame_path(folder: Path, frame: int) -> Path:
    return Path(folder) / f"frame_{frame:06d}.png"


def frame_key(controls, edits: dict, size: int | None, avatar_id: str) -> str:
    """What a rendered frame shows, as a short hash (controls to 1e-3, as the preview cache keys them)."""
    what = [list(quantise(controls)), sorted((edits or {}).items()), size, avatar_id]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def read_manifest(folder: Path) -> dict[str, str]:
    try:
        return dict(json.loads((Path(folder) / MANIFEST).read_text())["frames"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no manifest (or a broken one): no file on disk can be trusted to show the right frame


def missing(folder: Path, keys: dict[int, str]) -> list[int]:
    """The frames (of ``keys``: frame -> key) not yet on disk showing what their key says, in order."""
    done = read_manifest(folder)
    return [f for f, k in keys.items() if not (frame_path(folder, f).exists() and done.get(str(f)) == k)]


def shown(folder: Path, keys: dict[int, str]) -> int:
    """How many of the frames of ``keys`` the manifest records as written with their key (progress)."""
    done = read_manifest(folder)
    return sum(done.get(str(f)) == k for f, k in keys.items())


def record(folder: Path, keys: dict) -> None:
    """Merge frames written (frame -> key) into the folder's manifest (several jobs may share one folder;
    one writer at a time)."""
    frames = {**read_manifest(folder), **{str(f): k for f, k in keys.items()}}
    write_text(Path(folder) / MANIFEST, json.dumps({"frames": frames}, sort_keys=True))
