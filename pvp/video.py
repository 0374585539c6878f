"""Reading frames: video files through OpenCV, or a folder of images, with clear errors."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class VideoError(ValueError):
    """An input that cannot be read as frames; the message names it."""


@dataclass
class FrameSource:
    path: Path
    fps: float
    frame_count: int  # as the container declares it (0 when unknown)
    width: int
    height: int

    def frames(self, start: int = 0, end: int | None = None, stride: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame index, RGB uint8 HxWx3) for indices start, start+stride, ... < end."""
        if start < 0 or stride < 1 or (end is not None and end <= start):
            raise VideoError(f"{self.path}: bad frame range start={start} end={end} stride={stride}")
        if self.path.is_dir():
            files = _image_files(self.path)
            for i in range(start, min(end or len(files), len(files)), stride):
                img = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
                if img is None:
                    raise VideoError(f"{files[i]}: cannot decode this image")
                yield i, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            return
        cap = cv2.VideoCapture(str(self.path))
        try:
            if start:
                cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            i = start
            while end is None or i < end:
                ok, bgr = cap.read()
                if not ok:
                    break
                if (i - start) % stride == 0:
                    yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                i += 1
        finally:
            cap.release()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def open_video(path) -> FrameSource:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file or folder")
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise VideoError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        first = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
        if first is None:
            raise VideoError(f"{files[0]}: cannot decode this image")
        return FrameSource(path, 30.0, len(files), first.shape[1], first.shape[0])
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty")
    cap = cv2.VideoCapture(str(path))
    try:
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            raise VideoError(f"{path}: cannot decode any frame (unsupported, corrupt or not a video)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return FrameSource(path, float(fps), max(count, 0), first.shape[1], first.shape[0])
    finally:
        cap.release()


def write_video(frames: list[Path], fps: float, path: Path) -> Path:
    """Image files -> an MP4 (MPEG-4 part 2, OpenCV's built-in encoder), written atomically."""
    from pvp_contract.atomic import atomic_path

    first = cv2.imread(str(frames[0]))
    with atomic_path(path) as tmp:
        tmp_video = tmp.with_suffix(Path(path).suffix)
        writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (first.shape[1], first.shape[0]))
        for f in frames:
            writer.write(cv2.imread(str(f)))
        writer.release()
        tmp_video.replace(tmp)
    return Path(path)
