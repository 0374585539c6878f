import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvp.models.mappers import BETA, MapperConfig, Mappers, hull_weights, load_mappers, save_mappers


def _mappers(k=7, num_ws=10, w_dim=16, e=5, seed=0):
    torch.manual_seed(seed)
    cfg = MapperConfig(num_pivots=k, num_ws=num_ws, w_dim=w_dim, jaw_expression_dim=e)
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
