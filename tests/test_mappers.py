import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvp_server.mappers import BETA, MapperConfig, Mappers, hull_weights


def _mappers(k=7, num_ws=10, w_dim=16, e=5, seed=0):
    torch.manual_seed(seed)
    cfg = MapperConfig(num_pivots=k, num_ws=num_ws, w_dim=w_dim, expression_dim=e)
    return Mappers(cfg, torch.randn(k, num_ws, w_dim))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=64))
def test_hull_weights_for_any_residual(values):
    a = hull_weights(torch.tensor([values], dtype=torch.float64), BETA)
    assert torch.all(a >= -BETA - 1e-9)
    assert abs(float(a.sum()) - 1.0) < 1e-9


@settings(max_examples=50, deadline=None)
@given(st.floats(-10, 10), st.floats(-10, 10), st.integers(0, 1000))
def test_pose_weights_for_any_input_and_weights(pitch, yaw, seed):
    m = _mappers(seed=seed)
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
