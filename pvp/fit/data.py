"""Training frames: FFHQ-aligned crops of the track's valid frames at the preset's resolution."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from pvp.tracking.align import SIZES, aligned_frames
from pvp.tracking.track import Track
from pvp_contract.atomic import atomic_path


def parse_range(text: str | None, n: int, what: str = "--train-frames") -> tuple[int, int]:
    """'A:B' (Python slice of the track's frames; either side may be empty) -> (start, stop)."""
    if not text:
        return 0, n
    try:
        a, b = text.split(":")
        start, stop = int(a) if a else 0, int(b) if b else n
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected A:B, e.g. 0:280") from None
    start, stop = max(0, start if start >= 0 else n + start), min(n, stop if stop >= 0 else n + stop)
    if stop <= start:
        raise ValueError(f"{what} {text!r}: empty range for a track of {n} frames")
    return start, stop


def aligned_at(track: Track, resolution: int):
    """Yield (frame index, aligned RGB crop at ``resolution``, 2x3 image->crop map) for the track's valid
    frames: cropped at the next standard size, then downsampled (area), as the training frames are."""
    crop_size = min(s for s in SIZES if s >= min(resolution, 1024))
    for i, img, A in aligned_frames(track, crop_size):
        if resolution != crop_size:
            img = cv2.resize(img, (resolution, resolution), interpolation=cv2.INTER_AREA)
        yield i, img, A * (resolution / crop_size)


def build_frames(track: Track, resolution: int, path: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """Aligned crops [N, R, R, 3] uint8 of every valid frame, cached in ``path``."""
    if path.is_file():
        return load_file(str(path))
    from tqdm import tqdm

    images, indices = [], []
    for i, img, _ in tqdm(aligned_at(track, resolution), total=int(track.valid.sum()), unit="frame",
                          desc=f"align {resolution}px", disable=not progress):
        images.append(img)
        indices.append(i)
    arrays = {"images": np.stack(images), "frame_index": np.array(indices, dtype=np.int64)}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))
    return arrays


def to_tensor(images: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
