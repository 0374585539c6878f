"""FFHQ alignment: eye centres and mouth corners -> an oriented square (the FFHQ recipe), smoothed over
time, then crop and resample. The crop's centre and axes are smoothed with Gaussian filters over time
(sigma 1 frame on the centre, 3 on the axes, as STIT and PVP's code do), which removes landmark jitter.

Per frame, FFHQ sizes the crop by the larger of the eyes' and the eye-to-mouth distance, so in a video an
opening mouth zooms the crop out (the face shrinks by up to a sixth on the shared clips). Given the head's
rigid scale, which expressions leave alone, the crop is sized by it instead, at the clip's FFHQ framing of
the frames its eyes size: the head keeps its size in the crop while the mouth opens."""
from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from pvp.tracking import topology as topo

SIZES = (256, 512, 1024)


EYE_SPAN, MOUTH_SPAN = 2.0, 1.8  # the crop's half-side: the larger of these times eye-to-eye and eye-to-mouth


def ffhq_anchors(lm2d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, L, 2] pixel landmarks -> the eyes' midpoint, eye-to-eye and eye-to-mouth vectors [N, 2] (the mouth:
    its corners' midpoint)."""
    eye_r = lm2d[:, list(topo.RIGHT_EYE)].mean(1)  # subject's right eye: image left
    eye_l = lm2d[:, list(topo.LEFT_EYE)].mean(1)
    eye_avg = (eye_l + eye_r) / 2
    mouth_avg = (lm2d[:, topo.MOUTH_RIGHT] + lm2d[:, topo.MOUTH_LEFT]) / 2
    return eye_avg, eye_l - eye_r, mouth_avg - eye_avg


def ffhq_half_sides(eye_to_eye: np.ndarray, eye_to_mouth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] half-sides of the FFHQ crop as the eyes and as the mouth would size it: the larger one does."""
    return np.linalg.norm(eye_to_eye, axis=1) * EYE_SPAN, np.linalg.norm(eye_to_mouth, axis=1) * MOUTH_SPAN


def ffhq_quad_params(lm2d: np.ndarray, head_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, L, 2] pixel landmarks -> (centre c [N, 2], half-axis x [N, 2]) of the FFHQ crop square.
    ``head_scale`` [N] (the rigid head fit's scale; NaN where none): the half-side is that times the clip's
    ratio of FFHQ's half-side to it on the frames the eyes size (``neutral_crop_ratio``), not each frame's."""
    eye_avg, eye_to_eye, eye_to_mouth = ffhq_anchors(lm2d)
    x = eye_to_eye - eye_to_mouth[:, ::-1] * np.array([-1, 1])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    by_eyes, by_mouth = ffhq_half_sides(eye_to_eye, eye_to_mouth)
    half = np.maximum(by_eyes, by_mouth)
    if head_scale is not None:
        half = head_scale * neutral_crop_ratio(half / head_scale, by_eyes >= by_mouth)
    return eye_avg + eye_to_mouth * 0.1, x * half[:, None]


def neutral_crop_ratio(ratio: np.ndarray, sized_by_eyes: np.ndarray) -> float:
    """The median of FFHQ's half-side over the head's scale on the frames whose crop the eyes size, where
    the mouth's opening does not enter it (over all frames if the mouth sizes every one); NaNs ignored."""
    finite = np.isfinite(ratio)
    pool = ratio[finite & sized_by_eyes]
    return float(np.median(pool if len(pool) else ratio[finite]))


def quad_from_params(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[N, 4, 2]: top-left, bottom-left, bottom-right, top-right corners."""
    y = x[:, ::-1] * np.array([-1, 1])
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y], 1)


def _smooth(values: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over valid frames only (invalid ones neither contribute nor change)."""
    if sigma <= 0 or valid.sum() < 2:
        return values.copy()
    out = values.copy()
    idx = np.flatnonzero(valid)
    out[idx] = gaussian_filter1d(values[idx], sigma, axis=0, mode="nearest")
    return out


def _bounded(raw: np.ndarray, smooth: np.ndarray, size: np.ndarray, max_shift: float) -> np.ndarray:
    """Keep a smoothed value within max_shift x crop size of the raw one: jitter (small) is removed, while
    fast real head motion, which a plain Gaussian would lag behind, is followed."""
    delta = smooth - raw
    norm = np.linalg.norm(delta, axis=-1, keepdims=True)
    limit = max_shift * size[:, None]
    return raw + delta * np.minimum(1.0, limit / np.maximum(norm, 1e-12))


def smoothed_quads(lm2d: np.ndarray, valid: np.ndarray, sigma_centre: float = 1.0, sigma_axes: float = 3.0,
                   max_shift: float = 0.012, head_scale: np.ndarray | None = None):
    c, x = ffhq_quad_params(lm2d, head_scale)
    size = 2 * np.linalg.norm(x, axis=-1)
    c_s = _bounded(c, _smooth(c, valid, sigma_centre), size, max_shift)
    x_s = _bounded(x, _smooth(x, valid, sigma_axes), size, max_shift / 2)
    return quad_from_params(c_s, x_s)


def unit_transform(quad: np.ndarray) -> np.ndarray:
    """[N, 4, 2] quads -> [N, 2, 3] affine maps from image pixels to the unit square of the crop."""
    src = quad[:, [0, 1, 3]].astype(np.float64)  # top-left, bottom-left, top-right
    dst = np.array([[0, 0], [0, 1], [1, 0]], dtype=np.float64)
    return np.stack([cv2.getAffineTransform(s.astype(np.float32), dst.astype(np.float32)) for s in src])


def apply_affine(A: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """A [2, 3] or [N, 2, 3]; pts [..., 2] (same leading N when A is batched)."""
    return pts @ np.swapaxes(A[..., :2], -1, -2) + A[..., None, :, 2] if A.ndim == 3 else pts @ A[:, :2].T + A[:, 2]


def crop(rgb: np.ndarray, quad: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample the quad [4, 2] of an RGB image into size x size. Returns (crop, 2x3 image->crop map).
    Large reductions are pre-filtered (area resize) so the crop does not alias."""
    if size not in SIZES:
        raise ValueError(f"aligned size must be one of {SIZES}, got {size}")
    A = unit_transform(quad[None])[0] * size
    side = np.linalg.norm(quad[3] - quad[0])
    shrink = int(np.floor(side / size / 2))
    img, pre = rgb, np.eye(3)
    if shrink > 1:
        img = cv2.resize(rgb, (rgb.shape[1] // shrink, rgb.shape[0] // shrink), interpolation=cv2.INTER_AREA)
        pre = np.diag([img.shape[1] / rgb.shape[1], img.shape[0] / rgb.shape[0], 1.0])
    A_img = A @ np.linalg.inv(pre)
    out = cv2.warpAffine(img, A_img, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out, A


def aligned_frames(track, size: int, source=None):
    """Yield (frame index, aligned RGB crop, 2x3 image->crop map) for the track's valid frames."""
    from pvp.video import open_video

    source = source or open_video(track.source)
    stride = int(track.settings.get("stride", 1))
    wanted = {int(i): k for k, i in enumerate(track.frame_index) if track.valid[k]}
    if not wanted:
        return
    first, last = min(wanted), max(wanted)
    for i, rgb in source.frames(first, last + 1, stride):
        if i in wanted:
            img, A = crop(rgb, track.align_quad[wanted[i]], size)
            yield i, img, A


def write_aligned_frames(track, out_dir, size: int = 512, progress: bool = True) -> int:
    """Write aligned PNGs (frame_NNNNNN.png) and transforms.json (image->crop maps); frames already
    written are kept, so an interrupted run resumes. Returns the number of frames written now."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from pvp.images import save_png
    from pvp_contract.atomic import write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transforms = {str(int(i)): (unit_transform(track.align_quad[k:k + 1])[0] * size).tolist()
                  for k, i in enumerate(track.frame_index) if track.valid[k]}
    written = 0
    todo = [int(i) for k, i in enumerate(track.frame_index)
            if track.valid[k] and not (out / f"frame_{int(i):06d}.png").exists()]
    if todo:
        for i, img, _ in tqdm(aligned_frames(track, size), total=int(track.valid.sum()), unit="frame",
                              desc=f"align {size}px", disable=not progress):
            path = out / f"frame_{i:06d}.png"
            if not path.exists():
                save_png(path, img)
                written += 1
    write_text(out / "transforms.json", json.dumps({"size": size, "source": track.source, "image_to_crop": transforms}))
    return written
