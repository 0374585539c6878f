"""Fit presets. ``paper`` is the paper's setting on the FFHQ prior; ``tiny`` and ``small`` learn a
personal prior from scratch on CPU, with no downloaded weights (perceptual loss: 1 - MS-SSIM, + L2)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int  # training and output resolution
    pivots: int  # K
    perceptual: str  # 'msssim' (no weights needed), 'lpips-vgg' or 'lpips-alex'
    needs_prior: bool  # True: a pretrained generator (--prior) is required
    # from-scratch prior (GLO: generator and per-frame latents learned together)
    channels: tuple[int, ...] = ()
    w_dim: int = 512
    mapping_layers: int = 8
    prior_steps: int = 0
    prior_batch: int = 8
    prior_lr: float = 2e-3
    latent_lr: float = 1e-2
    residual_weight: float = 1e-2  # keeps per-frame latents near their controls' linear prediction
    # inversion of the pivots in a pretrained prior (optimisation; e4e when given)
    invert_w_steps: int = 300
    invert_wplus_steps: int = 200
    invert_lr: float = 0.01
    # pivotal tuning (PTI, multi-pivot)
    pti_steps_per_pivot: int = 350
    pti_lpips_threshold: float = 0.03
    pti_lr: float = 3e-4
    pti_l2_weight: float = 1.0
    locality_weight_l2: float = 0.1
    locality_weight_perceptual: float = 0.1
    locality_alpha: float = 30.0
    locality_truncation: float = 0.5
    # mappers
    mapper_steps: int = 50_000
    mapper_lr: float = 5e-4
    mapper_batch: int = 1
    # Eq. 15 weights (the paper's by default)
    loss_l2: float = 10.0
    loss_perceptual: float = 10.0
    loss_identity: float = 0.5
    loss_pose: float = 0.1
    loss_expression: float = 0.1
    loss_consistency: float = 1.0
    loss_locality: float = 0.5
    perturbation_sigma: float = 0.5
    loss_novel_pose: float = 0.0  # beyond the paper (see mapper_training): off in its preset
    novel_pose_sigma_deg: float = 4.0
    checkpoint_every: int = 500

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    def loss_weights(self):
        from pvp.fit.mapper_training import LossWeights

        return LossWeights(l2=self.loss_l2, perceptual=self.loss_perceptual, identity=self.loss_identity,
                           pose=self.loss_pose, expression=self.loss_expression, consistency=self.loss_consistency,
                           locality=self.loss_locality, sigma=self.perturbation_sigma,
                           novel_pose=self.loss_novel_pose, novel_pose_sigma=math.radians(self.novel_pose_sigma_deg))

    def with_overrides(self, **kw) -> "Preset":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS = {
    # The CPU presets weigh pose consistency 100x the paper: their renders are small, and a degree of
    # head rotation is a far smaller change there than at 1024 px. They also train the novel-pose term:
    # a prior learned from one short video has no FFHQ behind it to fill in poses between the frames'.
    "tiny": Preset("tiny", resolution=64, pivots=32, perceptual="msssim", needs_prior=False,
                   channels=(128, 128, 128, 64, 32), w_dim=128, mapping_layers=2, prior_steps=4000, prior_batch=8,
                   pti_steps_per_pivot=10, mapper_steps=1500, mapper_batch=8, loss_pose=10.0, loss_novel_pose=10.0,
                   checkpoint_every=250),
    "small": Preset("small", resolution=128, pivots=64, perceptual="msssim", needs_prior=False,
                    channels=(256, 256, 256, 128, 64, 32), w_dim=256, mapping_layers=2, prior_steps=20000,
                    prior_batch=8, pti_steps_per_pivot=50, mapper_steps=10000, mapper_batch=8, loss_pose=10.0,
                    loss_novel_pose=10.0, checkpoint_every=500),
    "paper": Preset("paper", resolution=1024, pivots=200, perceptual="lpips-vgg", needs_prior=True),
}
