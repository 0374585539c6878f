"""DECA's coarse encoder (E_flame: ResNet-50 features -> Linear(2048, 1024) -> ReLU -> Linear(1024, 236))
and a differentiable tracker over it, for the mapper objective's pose and expression terms on DECA tracks
(as the authors' code: DECA re-reads every perturbed render).

Loads ``E_flame`` from the official ``deca_model.tar`` (yfeng95/DECA); decalib is not needed. The code
layout is DECA's ``param_list``: shape 100, tex 50, exp 50, pose 6 (global axis-angle, jaw axis-angle),
cam 3, light 27. Input: a 224x224 face crop, RGB in [0, 1] (the landmarks' bounding square scaled 1.25).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pvp.models.irse import load_checked, read_weights
from pvp.tracking.deca_backend import CROP_SCALE, CROP_SIZE

WHERE = ("deca_model.tar comes from DECA (github.com/yfeng95/DECA, its README links the download; "
         "the FLAME licence applies)")
CODES = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))


class DecaEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torchvision.models.resnet50(weights=None)
        self.encoder.fc = nn.Identity()  # DECA's ResNet ends at the pooled 2048-d features
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, sum(n for _, n in CODES)))

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, 224, 224] in [0, 1] -> DECA's codedict (shape, tex, exp, pose, cam, light)."""
        params = self.layers(self.encoder(crops))
        return dict(zip((name for name, _ in CODES), params.split([n for _, n in CODES], 1)))


def load_deca_encoder(path, device="cpu") -> DecaEncoder:
    checkpoint = read_weights(path, "DECA", WHERE)
    if not isinstance(checkpoint, dict) or "E_flame" not in checkpoint:
        from pvp.checkpoints.layout import CheckpointError

        raise CheckpointError(f"{path}: no 'E_flame' in it; is this DECA's deca_model.tar? {WHERE}")
    net = DecaEncoder()
    load_checked(net, dict(checkpoint["E_flame"]), str(path), "DECA's coarse encoder (E_flame)")
    return net.eval().requires_grad_(False).to(device)


def face_box(landmarks: np.ndarray, image_size: int) -> tuple[float, float, float]:
    """DECA's crop of landmarks [N, P, 2] (pixels): (centre x, centre y, side) in units of the image size,
    averaged over the frames; the bounding square scaled 1.25."""
    lo, hi = landmarks.min(1), landmarks.max(1)
    centre, side = (lo + hi) / 2, (hi - lo).max(1) * CROP_SCALE
    cx, cy = centre.mean(0) / image_size
    return float(cx), float(cy), float(side.mean() / image_size)


def rotation_matrices(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: [B, 3] rotation vectors -> [B, 3, 3], differentiable (also at zero)."""
    angle = axis_angle.norm(dim=1, keepdim=True).clamp(min=1e-8)
    k = axis_angle / angle
    zero = torch.zeros_like(k[:, 0])
    K = torch.stack([zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero], 1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(K)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    return eye + s * K + (1 - c) * K @ K


class DecaTracker(nn.Module):
    """Reads aligned renders ([-1, 1], square) with DECA through one fixed crop (FFHQ alignment puts the face
    in the same place in every frame). Returns the mapper objective's tracker outputs: ``head_pose`` (the
    global axis-angle the authors' pose term compares), pitch and yaw (radians, pvp's convention), ``jaw``
    (axis-angle) and ``expression`` (DECA's 50)."""

    def __init__(self, encoder: DecaEncoder, box: tuple[float, float, float]):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.box = box

    def crops(self, images: torch.Tensor) -> torch.Tensor:
        cx, cy, side = self.box
        theta = images.new_tensor([[side, 0, 2 * cx - 1], [0, side, 2 * cy - 1]]).expand(len(images), 2, 3)
        grid = F.affine_grid(theta, [len(images), 3, CROP_SIZE, CROP_SIZE], align_corners=False)
        return F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.encoder(self.crops(images))
        pose = code["pose"]
        R = rotation_matrices(pose[:, :3])
        return {"head_pose": pose[:, :3], "yaw": torch.atan2(R[:, 0, 2], R[:, 2, 2]),
                "pitch": torch.asin(R[:, 1, 2].clamp(-1, 1)), "jaw": pose[:, 3:], "expression": code["exp"]}
