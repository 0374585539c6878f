"""The differentiable tracker for the mappers' losses: aligned image tensor -> (head rotation, jaw,
expression) in PyTorch, with gradients reaching the image.

MediaPipe's face-landmark network (face_landmark.tflite, shipped in the mediapipe wheel) runs as a
PyTorch graph (:mod:`.tflite_graph`); its 468 landmarks then go through the same face model as the
embedded tracker (rigid fit to the canonical face, jaw angles, projection on the expression space).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pvp.tracking import topology as topo
from pvp.tracking.align import apply_affine, unit_transform
from pvp.tracking.face_model import FaceModel
from pvp.tracking.tflite_graph import TFLiteGraph

LANDMARK_INPUT = 192
# Where the landmark network looks in an FFHQ-aligned crop (centre x, centre y, side; fractions of the
# crop): MediaPipe's own ROI rule (landmark box x 1.5) measured on aligned frames of the shared clips, FFHQ's
# per-frame size; aligned_roi measures it on a track's own crops.
ALIGNED_ROI = (0.5, 0.58, 0.96)


def aligned_roi(track, positions: np.ndarray | None = None) -> tuple[float, float, float]:
    """MediaPipe's ROI rule on a track's aligned crops: the medians over its valid frames (of ``positions``, the
    avatar's training frames, when given) of the landmark box's centre and of 1.5 x its longer side (fractions
    of the crop). How large a face sits in its crops depends on the face and on the crop's size rule: lp_d12's
    sides are 1.01 in FFHQ's per-frame crops, 1.05 in head-sized ones (an open mouth kept at the head's size),
    against ALIGNED_ROI's 0.96."""
    chosen = np.arange(len(track)) if positions is None else np.asarray(positions)
    valid = chosen[track.valid[chosen]]
    points = apply_affine(unit_transform(track.align_quad[valid]),
                          track.landmarks_2d[valid][:, :topo.NUM_MESH, :2].astype(np.float64))
    low, high = points.min(1), points.max(1)
    cx, cy = np.median((low + high) / 2, 0)
    return float(cx), float(cy), float(np.median((high - low).max(1) * 1.5))


def mediapipe_landmark_model() -> Path:
    import mediapipe

    path = Path(os.path.dirname(mediapipe.__file__)) / "modules" / "face_landmark" / "face_landmark.tflite"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mediapipe's face-landmark model is missing; pvp needs mediapipe 0.10.x "
                                "(pip install 'mediapipe==0.10.14'), whose wheel ships it")
    return path


def umeyama_torch(src: torch.Tensor, dst: torch.Tensor):
    """Batched similarity fit dst ~ s R src + t; src [P, 3], dst [B, P, 3]. Differentiable."""
    mu_s, mu_d = src.mean(0), dst.mean(1, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    cov = b.transpose(1, 2) @ a / src.shape[0]
    u, d, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(d)
    sign[:, 2] = torch.sign(torch.det(u) * torch.det(vh))
    R = u @ torch.diag_embed(sign) @ vh
    s = (d * sign).sum(-1) / a.square().sum(-1).mean()
    t = mu_d[:, 0] - s[:, None] * (R @ mu_s)
    return s, R, t


class DifferentiableTracker(nn.Module):
    def __init__(self, face_model: FaceModel, roi=ALIGNED_ROI, landmark_model: Path | None = None):
        super().__init__()
        self.net = TFLiteGraph(landmark_model or mediapipe_landmark_model()).eval().requires_grad_(False)
        self.roi = roi
        f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("canonical", f32(face_model.canonical))
        self.register_buffer("mean", f32(face_model.mean))
        self.register_buffer("components", f32(face_model.components).reshape(len(face_model.components), -1))
        self.register_buffer("scales", f32(face_model.scales))
        self.register_buffer("jaw_reference", f32(face_model.jaw_reference))
        self.register_buffer("jaw_rows", f32(face_model.jaw_rows()))
        # constants on the module's device, so that a call copies nothing from the host
        cx, cy, side = roi
        self.register_buffer("roi_theta", f32([[side, 0, 2 * cx - 1], [0, side, 2 * cy - 1]]), persistent=False)
        self.register_buffer("roi_corner", f32([cx - side / 2, cy - side / 2, 0.0]), persistent=False)
        self.register_buffer("to_flame_axes", f32([1.0, -1.0, -1.0]), persistent=False)
        self.register_buffer("rigid", torch.as_tensor(list(topo.RIGID), dtype=torch.long), persistent=False)

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] (square) -> [B, 468, 3] in the image's pixels (x right, y down, z like x)."""
        b, _, h, w = images.shape
        side = self.roi[2]
        theta = self.roi_theta.to(images.dtype).expand(b, 2, 3)
        grid = F.affine_grid(theta, [b, 3, LANDMARK_INPUT, LANDMARK_INPUT], align_corners=False)
        crop = F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        raw = self.net(crop)[0].reshape(b, topo.NUM_MESH, 3)
        scale = side * w / LANDMARK_INPUT
        offset = torch.cat([self.roi_corner[:1] * w, self.roi_corner[1:2] * h, self.roi_corner[2:]]).to(images.dtype)
        return raw * scale + offset

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        lm = self.landmarks(images)
        mesh = lm * self.to_flame_axes  # FLAME frame: Y up, Z towards the camera
        s, R, t = umeyama_torch(self.canonical.index_select(0, self.rigid), mesh.index_select(1, self.rigid))
        free = ((mesh - t[:, None]) @ R) / s[:, None, None]
        nose = R[:, :, 2]
        yaw = torch.atan2(nose[:, 0], nose[:, 2])
        pitch = torch.asin(nose[:, 1].clamp(-1, 1))
        v = free[:, topo.CHIN] - (free[:, topo.EAR_RIGHT] + free[:, topo.EAR_LEFT]) / 2
        jaw = torch.stack([self.jaw_reference[0] - torch.atan2(v[:, 2], -v[:, 1]),
                           torch.atan2(v[:, 0], -v[:, 1]) - self.jaw_reference[1], torch.zeros_like(v[:, 0])], -1)
        # The jaw's offset as a constant: three landmarks set the jaw angle (two of them in the rigid set), and
        # through it their noise and an objective's gradient would reach every coefficient (the pitch paid).
        jaw_free = (free - self.mean).reshape(len(free), -1) - jaw[:, :2].detach() @ self.jaw_rows
        expression = jaw_free @ self.components.T / self.scales
        return {"landmarks": lm, "rotation": R, "scale": s, "yaw": yaw, "pitch": pitch, "jaw": jaw,
                "expression": expression}
