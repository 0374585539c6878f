import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvp.models.mappers import (
    BETA,
    LEGACY_DESIGN,
    MapperConfig,
    MapperDesign,
    Mappers,
    hull_weights,
    load_mappers,
    save_mappers,
)

ZERO_START = MapperDesign(zero_init_output=True)


def _mappers(k=7, num_ws=10, w_dim=16, e=5, seed=0, design=ZERO_START):
    torch.manual_seed(seed)
    cfg = MapperConfig(num_pivots=k, num_ws=num_ws, w_dim=w_dim, jaw_expression_dim=e, design=design)
    return Mappers(cfg, torch.randn(k, num_ws, w_dim))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=64))
def test_eq6_hull_weights_for_any_residual(values):
    a = hull_weights(torch.tensor([values], dtype=torch.float64), BETA, "eq6")
    assert torch.all(a >= -BETA - 1e-9)
    assert abs(float(a.sum()) - 1.0) < 1e-9


def _authors_hull(residual: list[float], beta: float) -> list[float]:
    """softplus(a + beta, 100) - beta over a = 1/K + residual, divided by the sum; written out in floats."""
    k = len(residual)
    shifted = [math.log1p(math.exp(100 * (1 / k + r + beta))) / 100 - beta for r in residual]
    return [s / sum(shifted) for s in shifted]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-0.05, 0.9), min_size=2, max_size=40))
def test_authors_hull_weights_are_the_normalised_shifted_softplus(values):
    a = hull_weights(torch.tensor([values], dtype=torch.float64), BETA, "authors")[0].tolist()
    assert a == pytest.approx(_authors_hull(values, BETA), abs=1e-9)


def test_the_authors_hull_leaves_less_room_below_zero_than_eq6():
    """K = 200, a quarter of the weights pushed up, the rest down (as a trained pose MLP does): eq6 reaches
    -beta; the authors' sum of shifted weights is about 42, so their weights stay above -beta / 42."""
    residual = torch.full((1, 200), -0.9, dtype=torch.float64)
    residual[0, :50] = 0.9
    eq6, authors = hull_weights(residual, BETA, "eq6"), hull_weights(residual, BETA, "authors")
    assert eq6.min().item() == pytest.approx(-BETA, abs=1e-6)
    assert authors.min().item() == pytest.approx(-BETA / (50 * (0.9 + 1 / 200) - 150 * BETA), rel=1e-3)
    assert authors.sum().item() == pytest.approx(1.0) and eq6.sum().item() == pytest.approx(1.0)


def test_default_design_is_the_authors_mlp():
    """Linear -> LeakyReLU(0.01) -> Linear -> Tanh with PyTorch's default initialisation of both layers."""
    m = _mappers(design=MapperDesign())
    x = torch.randn(4, 5)
    net = m.expression.nets[0]
    h = x @ net[0].weight.T + net[0].bias
    expected = torch.tanh(torch.where(h > 0, h, 0.01 * h) @ net[2].weight.T + net[2].bias)
    assert torch.allclose(m.expression(x)[:, 0], expected, atol=1e-6)
    assert net[2].weight.abs().sum() > 0  # not zero-initialised: the mappers start off the centroid
    with pytest.raises(ValueError, match="hull"):
        MapperDesign(hull="convex")


def test_bundles_from_before_the_design_field_load_as_they_were_trained(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = _mappers(design=LEGACY_DESIGN)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_mappers(m, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    del config["design"]
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"config": json.dumps(config)})
    old = load_mappers(tmp_path / "old.safetensors")
    assert old.cfg.design == LEGACY_DESIGN
    x = (torch.randn(3, 2), torch.randn(3, 5))
    assert torch.equal(old(*x)[0], m(*x)[0])


@settings(max_examples=50, deadline=None)
@given(st.floats(-10, 10), st.floats(-10, 10), st.integers(0, 1000))
def test_pose_weights_for_any_input_and_weights(pitch, yaw, seed):
    m = _mappers(seed=seed, design=MapperDesign(hull="eq6"))
    for p in m.pose.net.parameters():  # trained-looking (non-zero) weights
        torch.nn.init.normal_(p, std=3.0)
    a = m.pose.weights(torch.tensor([[pitch, yaw]])).detach()
    assert torch.all(a >= -BETA - 1e-6) and abs(float(a.sum()) - 1) < 1e-5


def test_initial_pose_mapper_returns_the_centroid():
    m = _mappers()
    w = m.pose(torch.randn(4, 2))
    assert torch.allclose(w, m.pose.pivots.mean(0).expand_as(w), atol=1e-5)
    assert torch.allclose(m.pose.weights(torch.randn(3, 2)), torch.full((3, 7), 1 / 7), atol=1e-6)


def test_expression_mapper_changes_only_the_first_eight_layers():
    m = _mappers()
    for p in m.expression.parameters():
        torch.nn.init.normal_(p)
    pitch_yaw, expr = torch.randn(3, 2), torch.randn(3, 5)
    w, delta = m(pitch_yaw, expr)
    assert torch.count_nonzero(delta[:, 8:]) == 0 and torch.count_nonzero(delta[:, :8]) > 0
    assert torch.equal(w[:, 8:], m.pose(pitch_yaw)[:, 8:])
    assert torch.allclose(w, m.pose(pitch_yaw) + delta)


def test_gradients_reach_both_mappers():
    m = _mappers()
    w, delta = m(torch.randn(2, 2), torch.randn(2, 5))
    (w.square().sum() + delta.sum()).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.pose.net[2].weight.grad.abs().sum() > 0 and m.expression.nets[0][2].weight.grad.abs().sum() > 0


def test_inputs_are_standardised_and_the_statistics_saved(tmp_path):
    m = _mappers()
    for net in [m.pose.net, *m.expression.nets]:
        torch.nn.init.normal_(net[2].weight)
    pitch_yaw = torch.randn(50, 2) * 0.1 + 0.3
    jaw_expression = torch.cat([torch.rand(50, 1) * 0.05, torch.zeros(50, 2), torch.randn(50, 2) * 2], 1)
    before = m(pitch_yaw, jaw_expression)[0]
    m.pose.inputs.fit(pitch_yaw)
    m.expression.inputs.fit(jaw_expression)
    z = m.pose.inputs(pitch_yaw)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5) and torch.allclose(z.std(0), torch.ones(2))
    assert torch.equal(m.expression.inputs.scale[1:3], torch.ones(2))  # constant columns stay as they are
    after = m(pitch_yaw, jaw_expression)[0]
    assert not torch.allclose(before, after)
    save_mappers(m, tmp_path / "m.safetensors")
    assert torch.equal(load_mappers(tmp_path / "m.safetensors")(pitch_yaw, jaw_expression)[0], after)


def _neutral_mappers(k=7, num_ws=10, w_dim=16, e=5, seed=0):
    """Mappers with neutral pivots whose pivots differ only by their own expressions' offsets: w_k = c + F_expr(e_k)."""
    torch.manual_seed(seed)
    cfg = MapperConfig(num_pivots=k, num_ws=num_ws, w_dim=w_dim, jaw_expression_dim=e,
                       design=MapperDesign(neutral_pivots=True))
    pivot_expressions = torch.randn(k, e)
    m = Mappers(cfg, torch.zeros(k, num_ws, w_dim), pivot_expressions)
    for p in [*m.pose.net.parameters(), *m.expression.parameters()]:  # trained-looking weights
        torch.nn.init.normal_(p, std=0.5)
    common = torch.randn(1, num_ws, w_dim)
    with torch.no_grad():
        m.pose.pivots.copy_(common + m.expression(pivot_expressions))
    return m, common


def test_neutral_pivots_leave_the_requested_expression_the_only_one_at_every_pose():
    """Pivots that differ only by their expressions: with neutral pivots every pose renders the requested one
    (c + F_expr(e)); without, the pose's blend of the pivots' expressions is added to it."""
    m, common = _neutral_mappers()
    pitch_yaw, expr = torch.randn(6, 2), torch.randn(6, 5)
    with torch.no_grad():
        w, offset = m(pitch_yaw, expr)
        wanted = common + m.expression(expr)
        assert torch.allclose(w, wanted, atol=1e-5)
        assert torch.allclose(offset, w - m.pose(pitch_yaw), atol=1e-5)  # the departure from the pivots' blend
        plain = Mappers(replace(m.cfg, design=MapperDesign()), m.pose.pivots.clone())
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "pivot_jaw_expression"})
        assert not torch.allclose(plain(pitch_yaw, expr)[0], wanted, atol=1e-2)


def test_neutral_pivots_render_a_pivot_at_its_own_expression_and_survive_a_file(tmp_path):
    m, _ = _neutral_mappers()
    m.pose.weights = lambda pitch_yaw: torch.eye(7)[[2] * len(pitch_yaw)]  # a blend of pivot 2 alone
    with torch.no_grad():
        w, offset = m(torch.zeros(1, 2), m.pivot_jaw_expression[2:3])
    assert torch.allclose(w, m.pose.pivots[2:3], atol=1e-5) and offset.abs().max() < 1e-5
    del m.pose.weights  # the pose mapper's own again
    save_mappers(m, tmp_path / "m.safetensors")
    back = load_mappers(tmp_path / "m.safetensors")
    x = (torch.randn(3, 2), torch.randn(3, 5))
    assert back.cfg.design.neutral_pivots and torch.equal(back(*x)[0], m(*x)[0])
    with pytest.raises(ValueError, match=r"neutral pivots need the pivots' jaw and expression \[7, 5\], got None"):
        Mappers(m.cfg, m.pose.pivots)
    with pytest.raises(ValueError, match="are for neutral pivots"):
        Mappers(replace(m.cfg, design=MapperDesign()), m.pose.pivots, m.pivot_jaw_expression)
