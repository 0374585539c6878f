"""Training the pose and expression mappers with the paper's objective (Eq. 15), generator frozen.

Per step, for a batch of training frames: render I' at the frame's controls and I^e at perturbed
expression controls (jaw and expression + N(0, sigma), jaw in units of its own spread); then
  10 L2(I', I) + 10 perceptual(I', I) + 0.5 identity(I', I)
  + 0.1 |pose(I^e) - pose(I)|^2 + 0.1 |(jaw, exp)(I^e) - (jaw', exp')|^2     (the differentiable tracker)
  + 1.0 |m (I^e - I')|^2 (m leaves out eyes and mouth) + 0.5 (|dw_expr|^2 + |dw_expr^e|^2).
As in the paper, where DECA reads both the frame and the render, the tracker's targets are its own
reading of the training frame (at the training resolution), shifted by the perturbation: the bias of a
tracker reading small renders cancels out.

One term beyond the paper, off in its preset: novel pose. I^p is rendered at the frame's head pose
shifted by N(0, sigma_p) with a jaw and expression drawn uniformly from the renderer's ranges, and the
tracker must read the frame's pose plus the shift. The paper's terms only ask for the training frames'
poses with their own expressions (+ small perturbations), so the mappers are free to do anything between
and beyond them; with a personal prior learned from one short video (no FFHQ to fall back on) that is
where new performances land: poses between the frames', expressions at the edge of the learned range
(which the renderer clamps to) that must not tilt the head.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pvp.fit.training import run_steps, step_generator
from pvp.models.generator import Generator
from pvp.models.losses import PerceptualLoss
from pvp.models.mappers import JAW_AXES, MapperConfig, Mappers, mapper_inputs
from pvp.tracking import topology as topo
from pvp.tracking.align import apply_affine, unit_transform
from pvp_contract import controls

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
    novel_pose: float = 0.0
    sigma: float = 0.5  # expression perturbation (sd; jaw in units of its spread)
    novel_pose_sigma: float = 0.07  # head-pose shift of the novel-pose renders (radians)


@dataclass
class MapperData:
    """The training frames, on the training device."""

    pitch_yaw: torch.Tensor  # [N, 2] radians
    jaw_expression: torch.Tensor  # [N, 3 + K], jaw in radians
    frames: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    masks: torch.Tensor  # [N, 1, R, R], 0 on the eyes and the mouth
    drive_min: torch.Tensor  # [3 + K] the renderer's range of (jaw, expression): where the novel-pose
    drive_max: torch.Tensor  # renders draw their jaw and expression from


def drive_range(schema: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The schema's (jaw, expression) ranges in the expression mapper's units: (min [JAW_AXES + K], max)."""
    bounds = torch.from_numpy(np.stack(controls.ranges(schema)))
    lo, hi = mapper_inputs(bounds)[1]
    return lo, hi


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


class MapperObjective:
    """The loss terms of one batch (a dict: name -> scalar tensor); ``loss`` weighs them."""

    def __init__(self, G: Generator, data: MapperData, perceptual: PerceptualLoss, weights: LossWeights = LossWeights(),
                 tracker=None, identity=None):
        self.G = G.eval().requires_grad_(False)
        self.data, self.perceptual, self.weights = data, perceptual, weights
        self.tracker, self.identity = tracker, identity
        scale = data.jaw_expression.std(0).clamp(min=1e-3)
        scale[JAW_AXES:] = 1.0  # expression coefficients are unit-variance already
        self.noise_scale = scale
        self.reference = _tracker_reference(tracker, data.frames) if tracker is not None else None

    def render(self, mappers: Mappers, pitch_yaw: torch.Tensor, jaw_expression: torch.Tensor):
        w, dw = mappers(pitch_yaw, jaw_expression)
        return self.G.synthesis(w, noise_mode="const"), dw

    def terms(self, mappers: Mappers, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d, wt, device = self.data, self.weights, self.data.frames.device
        py, je, target = d.pitch_yaw[idx], d.jaw_expression[idx], d.frames[idx]
        img, dw = self.render(mappers, py, je)
        terms = {"l2": (img - target).square().mean(), "perceptual": self.perceptual(img, target).mean()}
        if self.identity is not None:
            terms["identity"] = self.identity(img, target).mean()
        je_pert = je + torch.randn(je.shape, generator=gen).to(device) * wt.sigma * self.noise_scale
        img_e, dw_e = self.render(mappers, py, je_pert)
        terms["locality"] = dw.square().mean() + dw_e.square().mean()
        terms["consistency"] = (d.masks[idx] * (img_e - img)).square().mean()
        if self.tracker is None:
            return terms
        ref = self.reference
        out = self.tracker(img_e)
        terms["pose"] = (_pitch_yaw(out) - ref["pitch_yaw"][idx]).square().mean()
        k = je.shape[1] - JAW_AXES
        predicted = torch.cat([out["jaw"][:, :2], out["expression"][:, :k]], 1)
        shift = torch.cat([(je_pert - je)[:, :2], (je_pert - je)[:, JAW_AXES:JAW_AXES + k]], 1)
        terms["expression"] = (predicted - ref["jaw_expression"][idx, :2 + k] - shift).square().mean()
        if wt.novel_pose > 0:
            py_shift = torch.randn(py.shape, generator=gen).to(device) * wt.novel_pose_sigma
            u = torch.rand(je.shape, generator=gen).to(device)
            img_p, _ = self.render(mappers, py + py_shift, d.drive_min + u * (d.drive_max - d.drive_min))
            terms["novel_pose"] = (_pitch_yaw(self.tracker(img_p)) - ref["pitch_yaw"][idx] - py_shift).square().mean()
        return terms

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.weights, name) * value for name, value in terms.items())


def train_mappers(G: Generator, pivots: torch.Tensor, data: MapperData, perceptual: PerceptualLoss, steps: int,
                  batch: int, lr: float, checkpoint: Path, every: int, resume: bool, tracker=None, identity=None,
                  weights: LossWeights = LossWeights(), seed: int = 0, progress: bool = True):
    """Returns (mappers, the last step's loss terms)."""
    device = data.frames.device
    cfg = MapperConfig(num_pivots=len(pivots), num_ws=G.num_ws, w_dim=G.cfg.w_dim,
                       jaw_expression_dim=data.jaw_expression.shape[1])
    torch.manual_seed(seed)
    mappers = Mappers(cfg, pivots).to(device).train()
    mappers.pose.inputs.fit(data.pitch_yaw)
    mappers.expression.inputs.fit(data.jaw_expression)
    opt = torch.optim.Adam(mappers.parameters(), lr=lr, betas=(0.9, 0.999))
    objective = MapperObjective(G, data, perceptual, weights, tracker, identity)

    def step(i: int) -> dict[str, float]:
        gen = step_generator(seed, i)
        terms = objective.terms(mappers, torch.randint(len(data.frames), (batch,), generator=gen).to(device), gen)
        loss = objective.loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}

    metrics = run_steps("mappers", steps, step, {"mappers": mappers, "opt": opt}, checkpoint, every, resume, progress)
    return mappers.eval().requires_grad_(False), metrics


def _pitch_yaw(tracked: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([tracked["pitch"], tracked["yaw"]], 1)


@torch.no_grad()
def _tracker_reference(tracker, frames: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    outs = [tracker(frames[i:i + batch]) for i in range(0, len(frames), batch)]
    return {"pitch_yaw": torch.cat([_pitch_yaw(o) for o in outs]),
            "jaw_expression": torch.cat([torch.cat([o["jaw"][:, :2], o["expression"]], 1) for o in outs])}


def losses_record(weights: LossWeights, perceptual: str, identity: bool, tracker: bool) -> dict:
    """What avatar.json says of the objective actually used."""
    record = {k: {"weight": v, "enabled": True} for k, v in asdict(weights).items() if "sigma" not in k}
    record["perceptual"]["kind"] = perceptual
    record["identity"]["enabled"] = identity
    record["pose"]["enabled"] = record["expression"]["enabled"] = tracker
    record["novel_pose"]["enabled"] = tracker and weights.novel_pose > 0
    record["perturbation_sigma"] = weights.sigma
    record["novel_pose_sigma_deg"] = float(np.degrees(weights.novel_pose_sigma))
    return record
