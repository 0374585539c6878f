"""The mappers' objective (Eq. 15 + the novel-pose term): each term is zero where it should be and its
gradients reach the parameters it should."""
import dataclasses
import math

import pytest
import torch

from pvp.fit.mapper_training import LossWeights, MapperData, MapperObjective, drive_range, losses_record
from pvp.models.arcface import ArcFace, IdentityLoss
from pvp.models.losses import PerceptualLoss
from pvp.models.mappers import MapperConfig, Mappers
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
    jaw = torch.cat([torch.rand(N, 1) * 0.2, torch.zeros(N, 2)], 1)
    controls = (torch.randn(N, 2) * 0.2, torch.cat([jaw, torch.randn(N, EXPR)], 1))
    return G, pivots, tracker, identity, controls


def _mappers(G, pivots, controls, trained_expression: bool) -> Mappers:
    torch.manual_seed(1)
    m = Mappers(MapperConfig(num_pivots=len(pivots), num_ws=G.num_ws, w_dim=32, jaw_expression_dim=3 + EXPR, hidden=16),
                pivots)
    m.pose.inputs.fit(controls[0])
    m.expression.inputs.fit(controls[1])
    nets = [m.pose.net, *m.expression.nets] if trained_expression else [m.pose.net]
    for net in nets:
        torch.nn.init.normal_(net[2].weight, std=0.5)
    return m


def _objective(parts, mappers, frames, weights):
    G, _, tracker, identity, (pitch_yaw, jaw_expression) = parts
    data = MapperData(pitch_yaw, jaw_expression, frames, torch.ones(N, 1, 64, 64), jaw_expression.min(0).values,
                      jaw_expression.max(0).values)
    G.requires_grad_(True)  # the objective freezes it
    return MapperObjective(G, data, PerceptualLoss("msssim"), weights, tracker, identity)


def test_every_term_is_zero_when_the_renders_are_the_frames(parts):
    """Frames rendered by the mappers themselves, an expression mapper still at zero, no perturbation."""
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=False)
    with torch.no_grad():
        frames = G.synthesis(m(*controls)[0], noise_mode="const")
    weights = LossWeights(novel_pose=1.0, sigma=0.0, novel_pose_sigma=0.0)
    terms = _objective(parts, m, frames, weights).terms(m, torch.arange(N), torch.Generator().manual_seed(0))
    assert set(terms) == {"l2", "perceptual", "identity", "locality", "consistency", "pose", "expression",
                          "novel_pose"}
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


# term -> (reaches the pose mapper, reaches the expression mapper)
REACH = {"l2": (True, True), "perceptual": (True, True), "identity": (True, True), "locality": (False, True),
         "consistency": (True, True), "pose": (True, True), "expression": (True, True), "novel_pose": (True, True)}


def test_each_term_has_gradients_where_it_should(parts):
    G, pivots, _, _, controls = parts
    m = _mappers(G, pivots, controls, trained_expression=True)
    frames = torch.rand(N, 3, 64, 64) * 2 - 1
    objective = _objective(parts, m, frames, LossWeights(novel_pose=1.0))
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
    weights = LossWeights()
    assert weights.novel_pose == 0  # the paper's objective
    objective = _objective(parts, m, torch.zeros(N, 3, 64, 64), weights)
    objective.tracker = objective.identity = None
    terms = objective.terms(m, torch.arange(3), torch.Generator().manual_seed(0))
    assert set(terms) == {"l2", "perceptual", "locality", "consistency"}
    expected = sum(dataclasses.asdict(weights)[k] * v for k, v in terms.items())
    assert objective.loss(terms).item() == pytest.approx(expected.item())


def test_the_record_says_which_terms_ran():
    from pvp.fit.presets import PRESETS

    paper = losses_record(PRESETS["paper"].loss_weights(), "lpips-vgg", identity=True, tracker=True)
    assert paper["novel_pose"] == {"weight": 0.0, "enabled": False}
    assert paper["pose"] == {"weight": 0.1, "enabled": True}
    assert paper["perceptual"]["kind"] == "lpips-vgg" and paper["perturbation_sigma"] == 0.5
    tiny = losses_record(PRESETS["tiny"].loss_weights(), "msssim", identity=False, tracker=True)
    assert tiny["identity"]["enabled"] is False and tiny["novel_pose"] == {"weight": 10.0, "enabled": True}
    assert tiny["novel_pose_sigma_deg"] == pytest.approx(4.0)
    untracked = losses_record(PRESETS["tiny"].loss_weights(), "msssim", identity=False, tracker=False)
    assert not any(untracked[k]["enabled"] for k in ("pose", "expression", "novel_pose"))


def test_novel_pose_renders_draw_from_the_renderers_ranges():
    from pvp_contract import controls

    schema = controls.schema(2, (-20, 20), (-10, 10), (-1.0, 9.0), jaw_lateral_range=(-2.0, 3.0),
                             expression_ranges=[(-1.5, 2.5), (-3.0, 0.5)])
    lo, hi = drive_range(schema)
    assert torch.allclose(lo, torch.tensor([math.radians(-1.0), math.radians(-2.0), 0.0, -1.5, -3.0]))
    assert torch.allclose(hi, torch.tensor([math.radians(9.0), math.radians(3.0), 0.0, 2.5, 0.5]))
