"""Image files: PNG writing through Pillow, atomically."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pvp_contract.atomic import write_bytes


def save_png(path, rgb: np.ndarray) -> None:
    """rgb: HxWx3 uint8."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 or HxWx4 uint8 image, got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    write_bytes(Path(path), buf.getvalue())


def load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
