"""Training the pose and expression mappers with the paper's objective (Eq. 15), generator frozen.

Per step, for a batch of training frames: render I' at the frame's controls and I^e at perturbed
expression controls (jaw and expression + N(0, sigma), jaw in units of its own spread); then
  10 L2(I', I) + 10 perceptual(I', I) + 0.5 identity(I', I)
  + 0.1 |pose(I^e) - pose(I)|^2 + 0.1 |(jaw, exp)(I^e) - (jaw', exp')|^2     (the differentiable tracker)
  + 1.0 |m (I^e - I')|^2 (m leaves out eyes and mouth) + 0.5 (|dw_expr|^2 + |dw_expr^e|^2).
As in the paper, where DECA reads both the frame and the render, the tracker's targets are its own
reading of the training frame (at the training resolution), shifted by the perturbation: the bias of a
tracker reading small renders cancels out.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..generator import Generator
from ..losses import PerceptualLoss
from ..mappers import MapperConfig, Mappers
from ..tracking import topology as topo
from ..tracking.align import apply_affine, unit_transform
from .training import run_steps, step_generator

log = logging.getLogger(__name__)
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)


@dataclass(frozen=True)
class LossWeights:
    l2: float = 10.0
    perceptual: float = 10.0
    identity: float = 0.5
    pose: float = 0.1
    expression: float = 0.1
    consistency: float = 1.0
    locality: float = 0.5
    sigma: float = 0.5


def eyes_mouth_masks(landmarks_2d: np.ndarray, quads: np.ndarray, resolution: int) -> np.ndarray:
    """[N, 1, R, R] float masks, 0 on the eyes and the mouth (dilated), 1 elsewhere, in aligned crops."""
    A = unit_transform(quads) * resolution
    pts = apply_affine(A, landmarks_2d[:, :, :2].astype(np.float64))
    masks = np.ones((len(pts), 1, resolution, resolution), np.float32)
    kernel = np.ones((max(3, resolution // 16),) * 2, np.uint8)
    for i, p in enumerate(pts):
        region = np.zeros((resolution, resolution), np.uint8)
        for contour in (topo.RIGHT_EYE, topo.LEFT_EYE, OUTER_LIPS):
            cv2.fillPoly(region, [np.round(p[list(contour)]).astype(np.int32)], 1)
        masks[i, 0] = 1 - cv2.dilate(region, kernel)
    return masks


def train_mappers(G: Generator, pivots: torch.Tensor, frames: torch.Tensor, pitch_yaw: torch.Tensor,
                  jaw_expression: torch.Tensor, masks: torch.Tensor, perceptual: PerceptualLoss, steps: int,
                  batch: int, lr: float, checkpoint: Path, every: int, resume: bool, tracker=None, identity=None,
                  weights: LossWeights = LossWeights(), seed: int = 0, progress: bool = True):
    """pitch_yaw [N, 2] radians; jaw_expression [N, 3 + K] (jaw in radians). Returns (mappers, metrics)."""
    device = frames.device
    cfg = MapperConfig(num_pivots=len(pivots), num_ws=G.num_ws, w_dim=G.cfg.w_dim,
                       expression_dim=jaw_expression.shape[1])
    mappers = Mappers(cfg, pivots).to(device).train()
    opt = torch.optim.Adam(mappers.parameters(), lr=lr, betas=(0.9, 0.999))
    G = G.eval().requires_grad_(False)
    noise_scale = jaw_expression.std(0).clamp(min=1e-3)
    noise_scale[3:] = 1.0  # expression coefficients are unit-variance already
    reference = _tracker_reference(tracker, frames) if tracker is not None else None

    def step(i: int) -> dict[str, float]:
        gen = step_generator(seed, i)
        idx = torch.randint(len(frames), (batch,), generator=gen).to(device)
        py, je, target = pitch_yaw[idx], jaw_expression[idx], frames[idx]
        w, dw = mappers(py, je)
        img = G.synthesis(w, noise_mode="const")
        terms = {"l2": (img - target).square().mean(), "perceptual": perceptual(img, target).mean(),
                 "locality": dw.square().mean()}
        if identity is not None:
            terms["identity"] = identity(img, target).mean()
        je_pert = je + torch.randn(je.shape, generator=gen).to(device) * weights.sigma * noise_scale
        w_e, dw_e = mappers(py, je_pert)
        img_e = G.synthesis(w_e, noise_mode="const")
        terms["locality"] = terms["locality"] + dw_e.square().mean()
        terms["consistency"] = (masks[idx] * (img_e - img)).square().mean()
        if tracker is not None:
            out = tracker(img_e)
            terms["pose"] = (torch.stack([out["pitch"], out["yaw"]], 1) - reference["pitch_yaw"][idx]).square().mean()
            k = je.shape[1] - 3
            predicted = torch.cat([out["jaw"][:, :2], out["expression"][:, :k]], 1)
            shift = torch.cat([(je_pert - je)[:, :2], (je_pert - je)[:, 3:3 + k]], 1)
            terms["expression"] = (predicted - reference["jaw_expression"][idx, :2 + k] - shift).square().mean()
        loss = sum(getattr(weights, name) * value for name, value in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}

    metrics = run_steps("mappers", steps, step, {"mappers": mappers, "opt": opt}, checkpoint, every, resume, progress)
    return mappers.eval().requires_grad_(False), metrics


@torch.no_grad()
def _tracker_reference(tracker, frames: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    outs = [tracker(frames[i:i + batch]) for i in range(0, len(frames), batch)]
    return {"pitch_yaw": torch.cat([torch.stack([o["pitch"], o["yaw"]], 1) for o in outs]),
            "jaw_expression": torch.cat([torch.cat([o["jaw"][:, :2], o["expression"]], 1) for o in outs])}


def losses_record(weights: LossWeights, perceptual: str, identity: bool, tracker: bool) -> dict:
    """What avatar.json says of the objective actually used."""
    record = {k: {"weight": v, "enabled": True} for k, v in asdict(weights).items() if k != "sigma"}
    record["perceptual"]["kind"] = perceptual
    record["identity"]["enabled"] = identity
    record["pose"]["enabled"] = record["expression"]["enabled"] = tracker
    record["perturbation_sigma"] = weights.sigma
    return record
