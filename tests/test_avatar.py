import json

import numpy as np
import pytest
import torch

from pvp_server.avatar import Avatar, AvatarError, ExpressionStats, random_avatar, rotate_images
from pvp_server.controls import channel_names


@pytest.fixture(scope="module")
def avatar():
    return random_avatar(resolution=32, expression_dim=4)


def test_random_avatar_renders_every_control(avatar):
    names = channel_names(avatar.meta.schema)
    assert names[:5] == ["head_yaw", "head_pitch", "head_roll", "jaw_open", "jaw_lateral"] and len(names) == 9
    base = torch.zeros(1, 9)
    ref = avatar.render(base)
    assert ref.shape == (1, 3, 32, 32)
    for i, name in enumerate(names):
        moved = base.clone()
        moved[0, i] = 10.0 if i < 5 else 1.5
        assert not torch.allclose(avatar.render(moved), ref), name


def test_round_trip_through_the_bundle(avatar, tmp_path):
    avatar.save(tmp_path / "av")
    back = Avatar.load(tmp_path / "av")
    ctrl = torch.randn(3, 9) * 5
    assert torch.equal(back.render(ctrl), avatar.render(ctrl))
    assert back.meta.to_json() == json.loads(json.dumps(avatar.meta.to_json()))
    assert not any(p.suffix in (".pkl", ".pt", ".pth") for p in (tmp_path / "av").rglob("*"))


def test_bad_bundles_are_named(avatar, tmp_path):
    with pytest.raises(AvatarError, match="no avatar.json"):
        Avatar.load(tmp_path)
    avatar.save(tmp_path / "av")
    (tmp_path / "av" / "mappers.safetensors").unlink()
    with pytest.raises(AvatarError, match="mappers.safetensors is missing"):
        Avatar.load(tmp_path / "av")
    (tmp_path / "av" / "avatar.json").write_text("{nope")
    with pytest.raises(AvatarError, match="not valid JSON"):
        Avatar.load(tmp_path / "av")


def test_wrong_control_width_is_refused(avatar):
    with pytest.raises(ValueError, match=r"controls must be \[batch, 9\]"):
        avatar.render(torch.zeros(1, 5))


def test_roll_rotates_clockwise():
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 0, 4] = 1  # a dot at the top centre
    out = rotate_images(img, torch.tensor([90.0]))
    y, x = np.unravel_index(out[0, 0].argmax().item(), (9, 9))
    assert x > 4 and abs(y - 4) <= 1  # clockwise: top -> right


def test_reenactment_normalisation_maps_statistics():
    rng = np.random.default_rng(0)
    driving = rng.normal(3.0, 2.0, size=(500, 4))
    target = ExpressionStats([0, 1, -1, 0.5], [1, 0.5, 2, 1])
    out = target.normalise(driving, ExpressionStats.of(driving))
    assert np.allclose(out.mean(0), target.mean, atol=1e-9) and np.allclose(out.std(0), target.std, atol=1e-9)
