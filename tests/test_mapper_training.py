"""The mappers' objective (Eq. 15 + the novel-pose term): each term is zero where it should be, its
gradients reach the parameters it should, and the authors' formulas hold (values computed here)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pvp.fit.mapper_training import (
    MapperData,
    MapperObjective,
    ObjectiveConfig,
    downsample,
    drive_range,
    eyes_mouth_masks,
    losses_record,
    train_mappers,
)
from pvp.models.arcface import ArcFace, IdentityLoss
from pvp.models.discriminator import Discriminator, DiscriminatorConfig
from pvp.models.losses import PerceptualLoss
from pvp.models.mappers import BETA, SOFTPLUS_SHARPNESS, MapperConfig, MapperDesign, Mappers
from pvp.tracking.differentiable import DifferentiableTracker
from tests.official_layouts import random_generator

N, EXPR = 6, 4


@pytest.fixture(scope="module")
def parts(d3_track):
    torch.manual_seed(0)
    G = random_generator(resolution=64, channels=(32, 32, 32, 32, 16), w_dim=32, mapping_layers=2)
    pivots = G.map_z(torch.randn(5, 32)).detach()
    tracker = DifferentiableTracker(d3_track.face_model)
    identity = IdentityLoss(ArcFace().eval().requires_grad_(False))
    jaw = torch.cat([torch.rand(N, 1) * 0.2, torch.randn(N, 1) * 0.05, torch.zeros(N, 1)], 1)  # open, lateral, 0
    controls = (torch.randn(N, 2) * 0.2, torch.cat([jaw, torch.randn(N, EXPR)], 1))
    return G, pivots, tracker, identity, controls


def _mappers(G, pivots, controls, trained_expression: bool) -> Mappers:
    torch.manual_seed(1)
    cfg = MapperConfig(num_pivots=len(pivots), num_ws=G.num_ws, w_dim=32, jaw_expression_dim=3 + EXPR, hidden=16,
                       design=MapperDesign(zero_init_output=True))
    m = Mappers(cfg, pivots)
    m.pose.inputs.fit(controls[0])
    m.expression.inputs.fit(controls[1])
    nets = [m.pose.net, *m.expression.nets] if trained_expression else [m.pose.net]
    for net in nets:
        torch.nn.init.normal_(net[2].weight, std=0.5)
    return m


def _objective(parts, mappers, frames, weights, dtype=torch.float32):
    G, _, tracker, identity, (pitch_yaw, jaw_expression) = parts
    size = frames.shape[-1]
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, size, size), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)
    G.requires_grad_(True)  # the objective freezes it
    return MapperObjective(G, data, PerceptualLoss("msssim"), weights, tracker, identity, dtype)


def test_every_term_is_zero_when_the_renders_are_the_frames(parts):
    """Frames rendered by the mappers themselves, an expression mapper still at zero, no perturbation."""
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=False)
    with torch.no_grad():
        frames = G.synthesis(m(*controls)[0], noise_mode="const")
    weights = ObjectiveConfig(novel_pose=1.0, detail_energy=1.0, sigma=0.0, novel_pose_sigma_deg=0.0)
    terms = _objective(parts, m, frames, weights).terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    assert set(terms) == {"l2", "perceptual", "identity", "locality", "consistency", "pose", "expression",
                          "novel_pose", "detail_energy"}
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


# term -> (reaches the pose mapper, reaches the expression mapper)
REACH = {"l2": (True, True), "perceptual": (True, True), "identity": (True, True), "locality": (False, True),
         "consistency": (True, True), "pose": (True, True), "expression": (True, True), "novel_pose": (True, True),
         "detail_energy": (True, True), "blend_spread": (True, False)}


def test_each_term_has_gradients_where_it_should(parts):
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=True)
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    objective = _objective(parts, m, frames, ObjectiveConfig(novel_pose=1.0, detail_energy=1.0, perturb_jaw=True,
                                                             blend_spread=1.0))
    terms = objective.terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    assert set(terms) == set(REACH)
    for name, (pose, expression) in REACH.items():
        assert terms[name].item() > 0, name
        m.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        pose_grad = sum(p.grad.abs().sum() for p in m.pose.net.parameters() if p.grad is not None)
        expr_grad = sum(p.grad.abs().sum() for p in m.expression.parameters() if p.grad is not None)
        assert (pose_grad > 0) == pose and (expr_grad > 0) == expression, name
    assert all(p.grad is None for p in G.parameters()), "the generator stays frozen"


def test_switched_off_terms_are_absent_and_weighted_sum(parts):
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=True)
    weights = ObjectiveConfig()
    assert weights.novel_pose == 0  # the paper's objective
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), weights)
    objective.tracker = objective.identity = None
    terms = objective.terms(m, torch.arange(3), torch.Generator().manual_seed(0))
    assert set(terms) == {"l2", "perceptual", "locality", "consistency"}
    expected = sum(dataclasses.asdict(weights)[k] * v for k, v in terms.items())
    assert objective.loss(terms).item() == pytest.approx(expected.item())


def test_the_record_says_which_terms_ran():
    from pvp.fit.presets import PRESETS

    paper = losses_record(PRESETS["paper"].objective, "lpips-vgg", identity=True, tracker="deca")
    assert paper["novel_pose"] == {"weight": 0.0, "enabled": False}
    assert paper["pose"] == {"weight": 0.1, "enabled": True} and paper["tracker"] == "deca"
    assert paper["perceptual"]["kind"] == "lpips-vgg" and paper["sigma"] == 0.5
    assert paper["loss_resolution"] == 512 and paper["optimize_noise"] and not paper["perturb_jaw"]
    tiny = losses_record(PRESETS["tiny"].objective, "msssim", identity=False, tracker="mediapipe")
    assert tiny["identity"]["enabled"] is False and tiny["novel_pose"] == {"weight": 10.0, "enabled": True}
    assert tiny["novel_pose_sigma_deg"] == pytest.approx(4.0)
    assert tiny["detail_energy"] == {"weight": 5.0, "enabled": True}
    assert paper["detail_energy"] == {"weight": 0.0, "enabled": False}
    assert tiny["adversarial"] == paper["adversarial"] == {"weight": 0.0, "enabled": False}
    assert tiny["blend_spread"] == paper["blend_spread"] == {"weight": 0.0, "enabled": False}
    assert tiny["novel_pose_drive"] == paper["novel_pose_drive"] == "uniform"
    spread = losses_record(dataclasses.replace(PRESETS["tiny"].objective, blend_spread=0.5), "msssim", False, None)
    assert spread["blend_spread"] == {"weight": 0.5, "enabled": True}
    untracked = losses_record(PRESETS["tiny"].objective, "msssim", identity=False, tracker=None)
    assert not any(untracked[k]["enabled"] for k in ("pose", "expression", "novel_pose"))


def test_novel_pose_renders_draw_from_the_renderers_ranges():
    from pvp_contract import controls

    schema = controls.schema(2, (-20, 20), (-10, 10), (-1.0, 9.0), jaw_lateral_range=(-2.0, 3.0),
                             expression_ranges=[(-1.5, 2.5), (-3.0, 0.5)])
    lo, hi = drive_range(schema)
    assert torch.allclose(lo, torch.tensor([math.radians(-1.0), math.radians(-2.0), 0.0, -1.5, -3.0]))
    assert torch.allclose(hi, torch.tensor([math.radians(9.0), math.radians(3.0), 0.0, 2.5, 0.5]))


@pytest.mark.parametrize("drive", ["uniform", "recombined"])
def test_novel_pose_drives(parts, drive):
    """'uniform': each channel drawn over the renderer's range on its own, as before the option (the same draws);
    'recombined': a random training frame's jaw and expression, whole, whichever frames the batch holds."""
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=False)
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), ObjectiveConfig(novel_pose_drive=drive))
    frames_je, lo, hi = controls[1], objective.data.drive_min, objective.data.drive_max
    batch = frames_je[[0] * 8]  # one frame's controls, repeated
    drawn = torch.cat([objective.novel_pose_controls(batch, torch.Generator().manual_seed(s)) for s in range(20)])
    assert drawn.shape == (20 * 8, frames_je.shape[1])
    if drive == "recombined":
        assert (drawn[:, None] == frames_je[None]).all(-1).any(1).all()  # every row a training frame's
        assert len(torch.unique(drawn, dim=0)) == N  # every frame drawn, not only the batch's
    else:
        before = torch.cat([lo + torch.rand(batch.shape, generator=torch.Generator().manual_seed(s)) * (hi - lo)
                            for s in range(20)])
        assert torch.equal(drawn, before)
    with pytest.raises(ValueError, match="novel_pose_drive"):
        ObjectiveConfig(novel_pose_drive="frames")


def test_blend_spread_is_one_less_the_blends_squared_weights(parts):
    """0 when each frame's blend is one pivot; 1 - 1/K when it is the pivots' centroid; negative weights count by
    their size (a blend that reaches past one pivot is not one pivot)."""
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=False)
    torch.nn.init.zeros_(m.pose.net[2].weight)
    torch.nn.init.zeros_(m.pose.net[2].bias)  # the centroid
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), ObjectiveConfig(blend_spread=1.0))
    objective.tracker = objective.identity = None
    gen = torch.Generator().manual_seed(0)
    k = len(pivots)
    assert objective.terms(m, torch.arange(N), gen)["blend_spread"].item() == pytest.approx(1 - 1 / k, abs=1e-5)
    # every weight but the first to 0: softplus(a + beta, 100) = beta
    zero = math.log(math.expm1(SOFTPLUS_SHARPNESS * BETA)) / SOFTPLUS_SHARPNESS - BETA - 1 / k
    torch.nn.init.constant_(m.pose.net[2].bias[1:], math.atanh(zero))
    assert objective.terms(m, torch.arange(N), gen)["blend_spread"].item() == pytest.approx(0.0, abs=1e-4)
    torch.nn.init.constant_(m.pose.net[2].bias[1:], -1.0)  # the others at the hull's floor, -beta, before the sum
    weights = m.pose.weights(controls[0])
    assert (weights[:, 1:] < 0).all() and (weights.square().sum(-1) > 1).all()
    share = weights.abs() / weights.abs().sum(-1, keepdim=True)
    spread = objective.terms(m, torch.arange(N), gen)["blend_spread"].item()
    assert spread == pytest.approx(1 - share.square().sum(-1).mean().item(), abs=1e-5) and spread > 0.3
    assert "blend_spread" not in _objective(parts, m, torch.zeros(N, 3, 64, 64), ObjectiveConfig()).terms(
        m, torch.arange(N), gen)


def _constant_expression_offsets(m: Mappers, value: float) -> None:
    """Every expression MLP outputs ``value`` whatever its input (tanh of a constant bias)."""
    for net in m.expression.nets:
        torch.nn.init.zeros_(net[2].weight)
        torch.nn.init.constant_(net[2].bias, math.atanh(value))


def test_locality_averages_the_predicted_layers_only(parts):
    """The authors' manifold term: mean of dw^2 over the 8 layers the expression MLPs predict, for the
    normal and the perturbed render: 2 c^2 for constant offsets c (not 2 c^2 * 8 / num_ws)."""
    G, pivots, _, _, controls = parts
    assert G.num_ws > 8
    m = _mappers(G, pivots, controls, trained_expression=False)
    _constant_expression_offsets(m, 0.3)
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), ObjectiveConfig())
    objective.tracker = objective.identity = None
    terms = objective.terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    assert terms["locality"].item() == pytest.approx(2 * 0.3**2, rel=1e-5)


@pytest.mark.parametrize("perturb_jaw", [False, True])
def test_the_perturbation_moves_the_jaw_only_when_asked(parts, perturb_jaw):
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=True)
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), ObjectiveConfig(perturb_jaw=perturb_jaw))
    je = controls[1]
    moved = objective.perturbed(je, torch.Generator().manual_seed(0)) != je
    assert moved[:, 3:].all()
    assert bool(moved[:, 0].all()) == perturb_jaw and not moved[:, 2].any()  # the third jaw axis never varies


class _TrackerReadingAJaw:
    """Reads every image as a head at rest with no expression and its jaw at ``jaw`` (radians, two axes)."""

    jaw = (0.0, 0.0)

    def __call__(self, images):
        n = len(images)
        jaw = torch.zeros(n, 3)
        jaw[:, :2] = torch.tensor(self.jaw)
        return {"pitch": torch.zeros(n), "yaw": torch.zeros(n), "jaw": jaw, "expression": torch.zeros(n, EXPR)}


def _expression_term(parts, controls, perturb_jaw: bool, read_jaw) -> float:
    """The expression term of renders the tracker reads with the jaw at ``read_jaw`` where it read the frames closed,
    the perturbation at 0."""
    G, pivots = parts[:2]
    m = _mappers(G, pivots, controls, trained_expression=True)
    tracker = _TrackerReadingAJaw()
    with_tracker = (*parts[:2], tracker, parts[3], controls)
    objective = _objective(with_tracker, m, torch.zeros(N, 3, 64, 64),
                           ObjectiveConfig(perturb_jaw=perturb_jaw, sigma=0.0))
    tracker.jaw = read_jaw
    return objective.terms(m, torch.arange(N), torch.Generator().manual_seed(0))["expression"].item()


@pytest.mark.parametrize("perturb_jaw", [True, False])
def test_the_expression_term_reads_the_jaw_in_units_of_its_spread(parts, perturb_jaw):
    """A render whose jaw is read one spread (sd over the training frames) from the frame's counts as much as an
    expression coefficient one sd away, each axis by its own spread; the jaw counts only where it is perturbed."""
    controls = parts[4]
    spread = controls[1][:, :2].std(0)
    assert (spread > np.radians(0.5)).all()
    term = _expression_term(parts, controls, perturb_jaw, (spread[0].item(), 2 * spread[1].item()))
    assert term == pytest.approx((1 + 4) / (2 + EXPR) if perturb_jaw else 0.0, rel=1e-4, abs=1e-9)


def test_a_jaw_that_hardly_moves_is_read_in_the_trackers_noise_not_its_spread(parts):
    """A lateral axis that never moves in training: a render read 0.5 degree off there counts as one sd, not as the
    thousands its (zero) spread would make of it."""
    pitch_yaw, jaw_expression = parts[4]
    still = jaw_expression.clone()
    still[:, 1] = 0.0
    term = _expression_term(parts, (pitch_yaw, still), True, (0.0, np.radians(0.5)))
    assert term == pytest.approx(1 / (2 + EXPR), rel=1e-4)


def test_the_objective_renders_in_the_dtype_asked_and_its_terms_stay_float32(parts):
    G, pivots, _, _, controls = parts
    mappers = _mappers(G, pivots, controls, trained_expression=True)
    renders = {}
    for dtype in (torch.float32, torch.bfloat16):
        objective = _objective(parts, mappers, torch.zeros(N, 3, 64, 64), ObjectiveConfig(), dtype)
        renders[dtype] = objective.render(mappers, *controls)[0].detach()
        terms = objective.terms(mappers, torch.arange(2), torch.Generator().manual_seed(0))
        assert {value.dtype for value in terms.values()} == {torch.float32}
    # the same image, rounded differently: bfloat16 keeps 8 significant bits, and CPUs without native bfloat16
    # round in other places (the largest difference under 0.1 with it, 0.12 without, on images spanning 12.6)
    reference = renders[torch.float32]
    difference = (reference - renders[torch.bfloat16]).abs()
    assert 0 < difference.max() < 0.02 * (reference.max() - reference.min())
    assert difference.mean() < 0.02 * reference.std()


def test_image_terms_at_the_loss_resolution(parts):
    """The authors downsample the render (antialiased bilinear, corners aligned) before every image term."""
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=True)
    frames = torch.rand(N, 3, 32, 32) * 2 - 1
    objective = _objective(parts, m, frames, ObjectiveConfig(loss_resolution=32))
    objective.tracker = objective.identity = None
    terms = objective.terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    with torch.no_grad():
        render = G.synthesis(m(*controls)[0], noise_mode="const")
    expected = F.interpolate(render, size=(32, 32), mode="bilinear", align_corners=True, antialias=True)
    assert terms["l2"].item() == pytest.approx((expected - frames).square().mean().item(), rel=1e-5)
    assert downsample(render, 512) is render  # never upsampled


def test_soft_masks_blur_dilated_hulls(d3_track):
    from pvp.fit.pipeline import aligned_landmarks

    args = (aligned_landmarks(d3_track, np.arange(3), 128), 128)
    soft, hard = eyes_mouth_masks(*args, kind="soft"), eyes_mouth_masks(*args, kind="hard")
    assert soft.min() >= 0 and soft.max() <= 1 and hard.min() == 0
    edges = ((soft > 0.05) & (soft < 0.95)).mean()
    assert edges > 0.01 and ((hard > 0) & (hard < 1)).mean() == 0  # soft edges only in the soft one
    assert (soft < 0.5).sum() > (hard < 0.5).sum()  # 31 px at 512 dilates further than R / 16 here
    assert soft[:, :, 0, 0].min() == pytest.approx(1.0)  # far from the face: fully counted
    with pytest.raises(ValueError, match="consistency_mask"):
        ObjectiveConfig(consistency_mask="round")


@pytest.mark.parametrize("optimize_noise", [False, True])
def test_noise_maps_train_with_the_mappers(parts, tmp_path, optimize_noise):
    """The authors re-randomise the generator's noise maps and optimise them with the mappers; its weights stay."""
    G, pivots, _, _, (pitch_yaw, jaw_expression) = parts
    G = G.__class__(G.cfg)
    G.load_state_dict(parts[0].state_dict())
    noise_before = {k: v.clone() for k, v in G.named_buffers() if k.endswith("noise_const")}
    weights_before = {k: v.clone() for k, v in G.state_dict().items() if k not in noise_before}
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, 64, 64), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)
    train_mappers(G, pivots, data, PerceptualLoss("msssim"), steps=2, batch=2, lr=5e-4, checkpoint=tmp_path / "c.pt",
                  every=1, resume=False, objective=ObjectiveConfig(optimize_noise=optimize_noise), progress=False)
    changed = [not torch.equal(v, noise_before[k]) for k, v in G.named_buffers() if k in noise_before]
    assert all(changed) if optimize_noise else not any(changed)
    assert all(torch.equal(v, weights_before[k]) for k, v in G.state_dict().items() if k in weights_before)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ("noise" in saved) == optimize_noise


def test_the_generator_trains_with_the_mappers_at_its_own_rate_when_asked(parts, tmp_path, monkeypatch):
    """A from-scratch prior's generator can go on learning where the mappers' latents land (generator_lr > 0):
    its synthesis weights change, at their own learning rate, and the checkpoint holds them."""
    G0, pivots, _, _, (pitch_yaw, jaw_expression) = parts
    G = G0.__class__(G0.cfg)
    G.load_state_dict(G0.state_dict())
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, 64, 64), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)
    seen_rates = []
    original_step = torch.optim.Adam.step

    def recording_step(opt, *args, **kwargs):
        seen_rates.append(sorted({group["lr"] for group in opt.param_groups}))
        return original_step(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    train_mappers(G, pivots, data, PerceptualLoss("msssim"), steps=2, batch=2, lr=5e-4, checkpoint=tmp_path / "c.pt",
                  every=1, resume=False, objective=ObjectiveConfig(optimize_noise=False), progress=False,
                  generator_lr=1e-5)
    assert seen_rates == [[1e-5, 5e-4]] * 2
    synthesis = {k for k in G.state_dict() if k.startswith("synthesis.") and not k.endswith("noise_const")}
    assert all(not torch.equal(G.state_dict()[k], G0.state_dict()[k]) for k in synthesis if k.endswith("weight"))
    assert all(torch.equal(v, G0.state_dict()[k]) for k, v in G.state_dict().items() if k not in synthesis)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["generator"]
    assert all(torch.equal(saved[k], v) for k, v in G.state_dict().items())
    assert not any(p.requires_grad for p in G.parameters())


def test_the_adversarial_term_trains_the_renders_and_a_checkpointed_discriminator(parts, tmp_path, monkeypatch):
    """Asked for, the term judges the renders between and beyond the frames (I^e, I^p): its gradients reach both
    mappers and not the discriminator, which train_mappers updates after every step, checkpoints and, resumed,
    goes on with."""
    G0, pivots, _, _, (pitch_yaw, jaw_expression) = parts
    m = _mappers(G0, pivots, (pitch_yaw, jaw_expression), trained_expression=True)
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    objective = _objective(parts, m, frames, ObjectiveConfig(novel_pose=1.0, adversarial=1.0))
    objective.discriminator = Discriminator(DiscriminatorConfig(64))
    terms = objective.terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    assert len(objective.fakes) == 2 * N
    terms["adversarial"].backward()
    for mapper in (m.pose.net, m.expression):
        assert sum(p.grad.abs().sum() for p in mapper.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in objective.discriminator.parameters())

    G = G0.__class__(G0.cfg)
    G.load_state_dict(G0.state_dict())
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, 64, 64), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)
    adversarial = ObjectiveConfig(optimize_noise=False, adversarial=0.5)

    def train(steps: int, resume: bool) -> dict:
        return train_mappers(G, pivots, data, PerceptualLoss("msssim"), steps=steps, batch=2, lr=5e-4,
                             checkpoint=tmp_path / "c.pt", every=1, resume=resume, progress=False,
                             objective=adversarial)[1]

    metrics = train(1, resume=False)
    assert {"adversarial", "d_loss"} <= set(metrics) and all(np.isfinite(v) for v in metrics.values())
    first = torch.load(tmp_path / "c.pt", weights_only=True)
    assert {"discriminator", "opt_d"} <= set(first)
    loaded = []
    original_load = Discriminator.load_state_dict

    def recording_load(self, state, *args, **kwargs):
        loaded.append(state)
        return original_load(self, state, *args, **kwargs)

    monkeypatch.setattr(Discriminator, "load_state_dict", recording_load)
    train(2, resume=True)
    assert len(loaded) == 1 and all(torch.equal(v, first["discriminator"][k]) for k, v in loaded[0].items())
    second = torch.load(tmp_path / "c.pt", weights_only=True)["discriminator"]
    assert any(not torch.equal(v, first["discriminator"][k]) for k, v in second.items())  # step 2 trained it


def test_a_weight_average_keeps_the_mean_of_noisy_steps_and_forgets_the_start():
    """Steps that jitter around a target: the average lies far closer to it than the last step; begun far from
    the target, within a few steps it no longer remembers where it began (a plain decay of 0.966 would)."""
    from pvp.fit.training import WeightAverage

    torch.manual_seed(0)
    weight = torch.full((4, 4), 100.0)  # the start, far away
    average = WeightAverage([weight], half_life=20)
    for step in range(5):
        weight.zero_()  # at the target
        average.update(step)
    assert average.average[0].abs().max() < 1.0
    for step in range(5, 400):
        weight.copy_(torch.randn(4, 4))  # the optimiser's noise about a target of 0
        average.update(step)
    last_error = weight.abs().mean()
    average.copy_to_tensors()
    assert weight.abs().mean() < last_error / 3
    with pytest.raises(ValueError, match="half_life"):
        WeightAverage([weight], half_life=0)


def test_what_the_mapper_stage_trains_is_kept_as_its_average_and_a_resume_continues_it(parts, tmp_path):
    """With a half-life the mapper stage keeps the average of the steps' weights (not the last step's) of all it
    trains — the mappers, the noise maps, the generator trained with them — and trains as without it; the
    checkpoint carries the average, so a stage stopped and resumed returns what an uninterrupted one does."""
    G0, pivots, _, _, (pitch_yaw, jaw_expression) = parts
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, 64, 64), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)

    def train(steps: int, resume: bool, half_life: float, name: str) -> dict[str, torch.Tensor]:
        G = G0.__class__(G0.cfg)
        G.load_state_dict(G0.state_dict())
        m, _ = train_mappers(G, pivots, data, PerceptualLoss("msssim"), steps=steps, batch=2, lr=5e-3,
                             checkpoint=tmp_path / f"{name}.pt", every=2, resume=resume, progress=False,
                             objective=ObjectiveConfig(optimize_noise=True), generator_lr=1e-3,
                             average_half_life=half_life)
        return {**{f"mappers.{k}": v for k, v in m.state_dict().items()},
                **{f"generator.{k}": v for k, v in G.synthesis.state_dict().items() if k.endswith("weight")},
                **{f"noise.{k}": v for k, v in G.named_buffers() if k.endswith("noise_const")}}

    last, averaged = train(4, False, 0.0, "last"), train(4, False, 2.0, "averaged")
    for part in ("mappers.", "generator.", "noise."):
        assert any(not torch.equal(v, averaged[k]) for k, v in last.items() if k.startswith(part)), part
    saved = torch.load(tmp_path / "averaged.pt", weights_only=True)
    assert all(torch.equal(v, last[f"mappers.{k}"]) for k, v in saved["mappers"].items())  # trained as without
    train(2, False, 2.0, "resumed")
    resumed = train(4, True, 2.0, "resumed")
    assert all(torch.allclose(v, averaged[k], atol=1e-6) for k, v in resumed.items())
