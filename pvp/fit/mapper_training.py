"""Training the pose and expression mappers with the paper's objective (Eq. 15), generator frozen.

Per step, for a batch of training frames: render I' at the frame's controls and I^e at perturbed
expression controls (expression + N(0, sigma); the jaw too when ``perturb_jaw``, in units of its spread);
then, the image terms on renders downsampled to at most 512 px (antialiased), as the authors' code:
  10 L2(I', I) + 10 perceptual(I', I) + 0.5 identity(I', I)
  + 0.1 |pose(I^e) - pose(I)|^2 + 0.1 |exp(I^e) - exp'|^2     (the tracker: DECA, or the differentiable one;
                                                               exp holds the jaw too when it is perturbed,
                                                               in units of its spread)
  + 1.0 |m (I^e - I')|^2 (m: 0 on the eyes and mouth, soft edges)
  + 0.5 (|dw_expr|^2 + |dw_expr^e|^2), averaged over the layers the expression mapper predicts.
The optimiser trains the mappers and, as the authors, the generator's noise maps (re-randomised first).
As in the paper, where DECA reads both the frame and the render, the tracker's targets are its own
reading of the training frame, shifted by the perturbation: the bias of a tracker reading renders cancels.

One term beyond the paper, off in its preset: novel pose. I^p is rendered at the frame's head pose
shifted by N(0, sigma_p) with a jaw and expression drawn uniformly from the renderer's ranges (each channel on its
own: faces no one makes) or, ``novel_pose_drive='recombined'``, a random training frame's, whole (a face the video
shows, most often at a pose it was not shown with), and the tracker must read the frame's pose plus the shift.
The paper's terms only ask for the training frames' poses with their own expressions (+ small perturbations), so
the mappers are free to do anything between and beyond them; with a personal prior learned from one short video
(no FFHQ to fall back on) that is where new performances land: poses between the frames', expressions at the edge
of the learned range (which the renderer clamps to) that must not tilt the head.

Another, on in the CPU presets ``tiny`` and ``small`` (weight 5): fine-detail energy
(``pvp.models.losses.detail_energy_l1``) of I' and of I^e against the frame. L2 and the perceptual term settle
for blur wherever detail cannot be placed exactly; a prior trained with that term loses its detail again when the
generator trains on with the mappers unless their objective asks for it too (bench/RESULTS.md, issue 20).

And one off in every preset: adversarial. A small discriminator (``pvp.models.discriminator``, differentiable
augmentation, R1), trained beside the mappers on the training frames against I^e (and I^p where the novel-pose
term is on) — the renders between and beyond the frames, where no frame says what the detail is and the image
terms settle for blur; the mappers (and the generator, when it trains with them) are asked to make those renders
pass for frames. Measured on tiny (bench/RESULTS.md, issue 20): its effect on PSNR and sharpness changes sign
with the seed; not adopted.

And one off in every preset: blend spread, 1 - sum_i p_i^2 with p_i = |a_i| / sum_j |a_j| over the pose mapper's
weights at the frames' poses (1 - 1 / the number of pivots a blend spreads over evenly; by size, as the hull lets a
blend reach past its pivots with negative weights). The pose mapper sees the head pose alone, so the image terms
settle for blends of many pivots that differ in expression (9-11 evenly weighted pivots' worth, 1 / sum a^2, at the
shared clips' training poses): a latent no frame had. At the centroid, where the CPU presets' zero-started pose
mapper begins, the term's gradient is zero: it acts once the image terms have moved the blends.

And a training choice beyond the authors': what the stage trains (the mappers, and the noise maps and generator where
they train) may be kept as the moving average of the last steps' weights (``average_half_life``, Polyak averaging)
rather than the last step's, which its own batch of frames pulled last.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pvp.fit.training import WeightAverage, run_steps, schedule_lr, step_generator
from pvp.models.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    diff_augment,
    discriminator_step,
    generator_adversarial_loss,
)
from pvp.models.generator import Generator
from pvp.models.losses import PerceptualLoss, detail_energy_l1
from pvp.models.mappers import JAW_AXES, MapperConfig, MapperDesign, Mappers, mapper_inputs
from pvp.tracking import topology as topo
from pvp_contract import controls

log = logging.getLogger(__name__)
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)


TERMS = ("l2", "perceptual", "identity", "pose", "expression", "consistency", "locality", "novel_pose",
         "detail_energy", "adversarial", "blend_spread")
DISCRIMINATOR_LR = 2e-3  # the from-scratch prior discriminator's starting rate (Preset.prior_lr's default); constant
CONSISTENCY_MASKS = ("soft", "hard")
NOVEL_POSE_DRIVES = ("uniform", "recombined")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Eq. 15's weights and how its terms are computed. The defaults are the authors' code (ken2576/pvp); the
    terms beyond the paper default to off."""

    l2: float = 10.0
    perceptual: float = 10.0
    identity: float = 0.5
    pose: float = 0.1
    expression: float = 0.1
    consistency: float = 1.0
    locality: float = 0.5
    novel_pose: float = 0.0  # beyond the paper (module docstring)
    detail_energy: float = 0.0  # beyond the paper (module docstring)
    adversarial: float = 0.0  # beyond the paper (module docstring)
    blend_spread: float = 0.0  # beyond the paper (module docstring)
    adversarial_r1: float = 0.1  # the discriminator's R1 penalty
    sigma: float = 0.5  # expression perturbation (sd)
    perturb_jaw: bool = False  # the authors perturb the expression only; the paper says jaw and expression
    novel_pose_sigma_deg: float = 4.0  # head-pose shift of the novel-pose renders
    novel_pose_drive: str = "uniform"  # their jaw and expression: NOVEL_POSE_DRIVES (module docstring)
    loss_resolution: int = 512  # image terms on renders downsampled to at most this size
    consistency_mask: str = "soft"  # 'soft': the authors' (eye and mouth hulls, dilated, blurred); 'hard'
    optimize_noise: bool = True  # train the generator's noise maps with the mappers (re-randomised first)

    def __post_init__(self):
        if self.consistency_mask not in CONSISTENCY_MASKS:
            raise ValueError(f"consistency_mask {self.consistency_mask!r}: expected soft or hard")
        if self.novel_pose_drive not in NOVEL_POSE_DRIVES:
            raise ValueError(f"novel_pose_drive {self.novel_pose_drive!r}: expected one of "
                             f"{', '.join(NOVEL_POSE_DRIVES)}")


@dataclass
class MapperData:
    """The training frames, on the training device."""

    pitch_yaw: torch.Tensor  # [N, 2] radians
    jaw_expression: torch.Tensor  # [N, 3 + K], jaw in radians
    frames: torch.Tensor  # [N, 3, S, S] in [-1, 1], S = the loss resolution (frames passed through ``downsample``)
    masks: torch.Tensor  # [N, 1, S, S], 0 on the eyes and the mouth
    drive_min: torch.Tensor  # [3 + K] the renderer's range of (jaw, expression): where the novel-pose
    drive_max: torch.Tensor  # renders draw their jaw and expression from


def drive_range(schema: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The schema's (jaw, expression) ranges in the expression mapper's units: (min [JAW_AXES + K], max)."""
    bounds = torch.from_numpy(np.stack(controls.ranges(schema)))
    lo, hi = mapper_inputs(bounds)[1]
    return lo, hi


def eyes_mouth_masks(pts: np.ndarray, resolution: int, kind: str = "soft") -> np.ndarray:
    """[N, 1, R, R] float masks from MediaPipe landmarks [N, 468, 2] in aligned crops of R pixels: 0 on the
    eyes and the mouth, 1 elsewhere. 'soft' (the authors'): each region's convex hull, dilated by a 31 px
    square and blurred with a Gaussian (sigma 5 px, 51 px window), sizes given at 512 px; 'hard': the
    contours dilated by R/16, no blur."""
    masks = np.ones((len(pts), 1, resolution, resolution), np.float32)
    at_512 = resolution / 512

    def odd(size: float) -> int:
        return max(1, int(round(size)) // 2 * 2 + 1)

    kernel = np.ones((odd(31 * at_512),) * 2 if kind == "soft" else (max(3, resolution // 16),) * 2, np.uint8)
    for i, p in enumerate(pts):
        region = np.zeros((resolution, resolution), np.uint8)
        for contour in (topo.RIGHT_EYE, topo.LEFT_EYE, OUTER_LIPS):
            polygon = np.round(p[list(contour)]).astype(np.int32)
            if kind == "soft":
                cv2.fillConvexPoly(region, cv2.convexHull(polygon), 1)
            else:
                cv2.fillPoly(region, [polygon], 1)
        covered = cv2.dilate(region, kernel).astype(np.float32)
        if kind == "soft":
            covered = cv2.GaussianBlur(covered, (odd(51 * at_512),) * 2, 5 * at_512, borderType=cv2.BORDER_REFLECT)
        masks[i, 0] = 1 - covered
    return masks


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to at most ``size`` (the authors' 1024 -> 512); smaller images pass."""
    if images.shape[-1] <= size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True, antialias=True)


class NoiseMaps:
    """The generator's constant noise buffers as trainable tensors, checkpointed with the mappers."""

    def __init__(self, G: Generator):
        self.maps = {name: buf for name, buf in G.named_buffers() if name.endswith("noise_const")}

    def randomize(self, gen: torch.Generator) -> None:
        for buf in self.maps.values():
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf))

    def trainable(self) -> list[torch.Tensor]:
        return [buf.requires_grad_(True) for buf in self.maps.values()]

    def freeze(self) -> None:
        for buf in self.maps.values():
            buf.requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buf.detach().clone() for name, buf in self.maps.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, buf in self.maps.items():
                buf.copy_(state[name])


class MapperObjective:
    """The loss terms of one batch (a dict: name -> scalar tensor); ``loss`` weighs them."""

    def __init__(self, G: Generator, data: MapperData, perceptual: PerceptualLoss,
                 config: ObjectiveConfig = ObjectiveConfig(), tracker=None, identity=None,
                 dtype: torch.dtype = torch.float32):
        self.G = G.eval().requires_grad_(False)
        self.dtype = dtype  # the generator's renders (training.render_dtype)
        self.data, self.perceptual, self.config = data, perceptual, config
        self.tracker, self.identity = tracker, identity
        spread = data.jaw_expression.std(0)
        # a jaw axis that hardly moves spreads by the tracker's noise, which the units below would amplify
        spread[:JAW_AXES] = spread[:JAW_AXES].clamp(min=np.radians(controls.JAW_NOISE_DEG))
        spread[JAW_AXES:] = 1.0  # expression coefficients are unit-variance already
        # the expression term reads the jaw in units of its spread, as it is perturbed: in radians its squared
        # error weighed some 1/350 of an expression coefficient's (a spread of 3 degrees): the term left it alone
        self.jaw_spread = spread[:2]  # its two free axes
        scale = spread.clone()
        scale[2] = 0.0  # the jaw's third axis is always 0 in the schema
        if not config.perturb_jaw:
            scale[:JAW_AXES] = 0.0
        self.noise_scale = scale
        self.reference = _tracker_reference(tracker, data.frames) if tracker is not None else None
        self.discriminator: Discriminator | None = None  # set for the adversarial term (train_mappers)
        self.fakes: torch.Tensor | None = None  # the last batch's renders the discriminator judged (detached)

    def perturbed(self, jaw_expression: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(jaw, expression) + N(0, sigma): the expression coefficients, and the jaw when ``perturb_jaw``."""
        noise = torch.randn(jaw_expression.shape, generator=gen, device=gen.device).to(jaw_expression.device)
        return jaw_expression + noise * self.config.sigma * self.noise_scale

    def render(self, mappers: Mappers, pitch_yaw: torch.Tensor, jaw_expression: torch.Tensor):
        """(full-size render, render at the loss resolution, the expression mapper's predicted offsets)."""
        w, dw = mappers(pitch_yaw, jaw_expression)
        img = self.G.synthesis(w, noise_mode="const", dtype=self.dtype)
        return img, downsample(img, self.config.loss_resolution), dw[:, :mappers.cfg.expr_layers]

    def terms(self, mappers: Mappers, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d, cfg, device = self.data, self.config, self.data.frames.device
        py, je, target = d.pitch_yaw[idx], d.jaw_expression[idx], d.frames[idx]
        _, img, dw = self.render(mappers, py, je)
        terms = {"l2": (img - target).square().mean(), "perceptual": self.perceptual(img, target).mean()}
        if self.identity is not None:
            terms["identity"] = self.identity(img, target).mean()
        je_pert = self.perturbed(je, gen)
        full_e, img_e, dw_e = self.render(mappers, py, je_pert)
        terms["locality"] = dw.square().mean() + dw_e.square().mean()
        terms["consistency"] = (d.masks[idx] * (img_e - img)).square().mean()
        if cfg.blend_spread > 0:
            share = mappers.pose.weights(py).abs()
            share = share / share.sum(-1, keepdim=True)  # the hull's negative weights count by their size
            terms["blend_spread"] = 1.0 - share.square().sum(-1).mean()
        if cfg.detail_energy > 0:
            terms["detail_energy"] = detail_energy_l1(img, target).mean() + detail_energy_l1(img_e, target).mean()
        fakes = [img_e]
        if self.tracker is not None:
            ref = self.reference
            out = self.tracker(full_e)
            terms["pose"] = (_head_pose(out) - ref["head_pose"][idx]).square().mean()
            k = je.shape[1] - JAW_AXES
            jaw = slice(0, 2 if cfg.perturb_jaw else 0)  # the tracked jaw counts where it was perturbed
            predicted = torch.cat([out["jaw"][:, jaw], out["expression"][:, :k]], 1)
            shift = torch.cat([je_pert[:, jaw] - je[:, jaw], je_pert[:, JAW_AXES:] - je[:, JAW_AXES:]], 1)
            reference = torch.cat([ref["jaw"][idx, jaw], ref["expression"][idx, :k]], 1)
            units = torch.cat([self.jaw_spread[jaw], torch.ones(k, device=device)])
            terms["expression"] = ((predicted - reference - shift) / units).square().mean()
        if self.tracker is not None and cfg.novel_pose > 0:
            py_shift = torch.randn(py.shape, generator=gen, device=gen.device).to(device) * np.radians(
                cfg.novel_pose_sigma_deg)
            img_p, small_p, _ = self.render(mappers, py + py_shift, self.novel_pose_controls(je, gen))
            terms["novel_pose"] = (_pitch_yaw(self.tracker(img_p)) - ref["pitch_yaw"][idx] - py_shift).square().mean()
            fakes.append(small_p)
        if self.discriminator is not None:
            judged = torch.cat(fakes).float()
            self.fakes = judged.detach()
            terms["adversarial"] = generator_adversarial_loss(self.discriminator, diff_augment(judged, gen))
        return terms

    def novel_pose_controls(self, je: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The novel-pose renders' (jaw, expression), one per row of ``je``."""
        d = self.data
        if self.config.novel_pose_drive == "recombined":
            other = torch.randint(len(d.jaw_expression), (len(je),), generator=gen, device=gen.device)
            return d.jaw_expression[other.to(d.jaw_expression.device)]
        u = torch.rand(je.shape, generator=gen, device=gen.device).to(je.device)
        return d.drive_min + u * (d.drive_max - d.drive_min)

    def discriminator_step(self, opt: torch.optim.Optimizer, gen: torch.Generator) -> torch.Tensor:
        """One update of the discriminator: random training frames against the last batch's renders."""
        d = self.data
        idx = torch.randint(len(d.frames), (len(self.fakes),), generator=gen, device=gen.device).to(d.frames.device)
        return discriminator_step(self.discriminator, opt, diff_augment(d.frames[idx], gen),
                                  diff_augment(self.fakes, gen), self.config.adversarial_r1)

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self.config, name) * value for name, value in terms.items())


def train_mappers(G: Generator, pivots: torch.Tensor, data: MapperData, perceptual: PerceptualLoss, steps: int,
                  batch: int, lr: float, checkpoint: Path, every: int, resume: bool, tracker=None, identity=None,
                  objective: ObjectiveConfig = ObjectiveConfig(), design: MapperDesign = MapperDesign(),
                  standardize_inputs: bool = False, lr_schedule: str = "constant", seed: int = 0,
                  progress: bool = True, generator_lr: float = 0.0, dtype: torch.dtype = torch.float32,
                  average_half_life: float = 0.0, pivot_jaw_expression: torch.Tensor | None = None):
    """Returns (mappers, the last step's loss terms). With ``objective.optimize_noise`` the generator's noise
    maps are trained too, and with ``generator_lr`` > 0 its synthesis weights (at that rate): in place, save G
    afterwards. ``dtype``: the generator's renders (training.render_dtype). ``average_half_life`` > 0: the
    mappers, noise maps and generator weights kept are their moving average over the steps (that half-life).
    ``pivot_jaw_expression``: the pivots' own (jaw, expression), for ``design.neutral_pivots``."""
    device = data.frames.device
    cfg = MapperConfig(num_pivots=len(pivots), num_ws=G.num_ws, w_dim=G.cfg.w_dim,
                       jaw_expression_dim=data.jaw_expression.shape[1], design=design)
    torch.manual_seed(seed)
    mappers = Mappers(cfg, pivots, pivot_jaw_expression).to(device).train()
    if standardize_inputs:
        mappers.pose.inputs.fit(data.pitch_yaw)
        mappers.expression.inputs.fit(data.jaw_expression)
    objective_fn = MapperObjective(G, data, perceptual, objective, tracker, identity, dtype)
    params, state = [{"params": list(mappers.parameters())}], {"mappers": mappers}
    noise = NoiseMaps(G)
    if objective.optimize_noise and noise.maps:
        noise.randomize(torch.Generator().manual_seed(seed))
        params.append({"params": noise.trainable()})
        state["noise"] = noise
    if generator_lr > 0:
        params.append({"params": list(G.synthesis.parameters()), "base_lr": generator_lr})
        G.synthesis.requires_grad_(True)
        state["generator"] = G
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    opt_d = None
    if objective.adversarial > 0:
        objective_fn.discriminator = Discriminator(DiscriminatorConfig(data.frames.shape[-1])).to(device).train()
        opt_d = torch.optim.Adam(objective_fn.discriminator.parameters(), lr=DISCRIMINATOR_LR, betas=(0.0, 0.99))
        state.update(discriminator=objective_fn.discriminator, opt_d=opt_d)
    average = None
    if average_half_life > 0:  # of all the optimiser trains: the mappers, the noise maps, the generator
        average = WeightAverage([t for group in params for t in group["params"]], average_half_life)
        state["average"] = average

    def step(i: int) -> dict[str, torch.Tensor]:
        schedule_lr(opt, lr, lr_schedule, i, steps)
        gen = step_generator(seed, i, device)
        idx = torch.randint(len(data.frames), (batch,), generator=gen, device=gen.device).to(device)
        terms = objective_fn.terms(mappers, idx, gen)
        loss = objective_fn.loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        judged = {"d_loss": objective_fn.discriminator_step(opt_d, gen)} if opt_d is not None else {}
        if average is not None:
            average.update(i)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}, **judged}

    metrics = run_steps("mappers", steps, step, {**state, "opt": opt}, checkpoint, every, resume, progress)
    if average is not None:
        average.copy_to_tensors()
    noise.freeze()
    G.requires_grad_(False)
    return mappers.eval().requires_grad_(False), metrics


def _pitch_yaw(tracked: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([tracked["pitch"], tracked["yaw"]], 1)


def _head_pose(tracked: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the pose term compares: the tracker's own head rotation (DECA: the global axis-angle, as the
    authors), else (pitch, yaw)."""
    return tracked["head_pose"] if "head_pose" in tracked else _pitch_yaw(tracked)


@torch.no_grad()
def _tracker_reference(tracker, frames: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    outs = [tracker(frames[i:i + batch]) for i in range(0, len(frames), batch)]
    return {"pitch_yaw": torch.cat([_pitch_yaw(o) for o in outs]),
            "head_pose": torch.cat([_head_pose(o) for o in outs]),
            "jaw": torch.cat([o["jaw"] for o in outs]), "expression": torch.cat([o["expression"] for o in outs])}


def losses_record(objective: ObjectiveConfig, perceptual: str, identity: bool, tracker: str | None) -> dict:
    """What avatar.json says of the objective actually used (``tracker``: the one reading renders, or None)."""
    settings = asdict(objective)
    record = {k: {"weight": settings.pop(k), "enabled": True} for k in TERMS}
    record["perceptual"]["kind"] = perceptual
    record["identity"]["enabled"] = identity
    record["pose"]["enabled"] = record["expression"]["enabled"] = tracker is not None
    record["novel_pose"]["enabled"] = tracker is not None and objective.novel_pose > 0
    record["detail_energy"]["enabled"] = objective.detail_energy > 0
    record["adversarial"]["enabled"] = objective.adversarial > 0
    record["blend_spread"]["enabled"] = objective.blend_spread > 0
    return {**record, **settings, "tracker": tracker}
