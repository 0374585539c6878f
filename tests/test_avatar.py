import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pvp.avatar import Avatar, AvatarError, random_avatar, rotate_images
from pvp_contract.controls import channel_names


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


def test_face_mesh_is_served_from_the_bundle_without_mediapipe(tmp_path):
    from pvp.tracking.face_model import FaceModel
    from pvp.tracking.topology import NUM_MESH, mesh_triangles

    rng = np.random.default_rng(0)
    avatar = random_avatar(resolution=32, expression_dim=4)
    mesh = rng.normal(size=(NUM_MESH, 3))
    avatar.face_model = FaceModel(mesh, mesh, rng.normal(size=(6, NUM_MESH, 3)), np.ones(6), np.full(6, 1 / 6),
                                  np.zeros(2))
    avatar.save(tmp_path / "av")
    code = ("import sys, numpy as np; sys.modules['mediapipe'] = None;"  # any import of mediapipe now fails
            "from pvp.avatar import Avatar; from pvp.serve.render_service import RenderService;"
            "mesh = RenderService(Avatar.load(sys.argv[1])).face_mesh();"
            "sys.stdout.buffer.write(mesh['triangles'])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "av")], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    np.testing.assert_array_equal(np.frombuffer(r.stdout, "<i4").reshape(-1, 3), np.asarray(mesh_triangles()))


def test_mapper_files_from_before_the_config_rename_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pvp.models.mappers import load_mappers, save_mappers

    avatar = random_avatar(resolution=32, expression_dim=4)
    save_mappers(avatar.mappers, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    config["expression_dim"] = config.pop("jaw_expression_dim")  # the field's name in earlier bundles
    save_file(load_file(str(tmp_path / "new.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={"config": json.dumps(config)})
    old = load_mappers(tmp_path / "old.safetensors")
    assert old.cfg == avatar.mappers.cfg and old.cfg.expression_coefficients == 4


def test_head_roll_is_clamped_like_every_control():
    avatar = random_avatar(resolution=32, expression_dim=4)
    limit = avatar.meta.schema["channels"][2]["max"]
    over, at = torch.zeros(1, avatar.num_channels), torch.zeros(1, avatar.num_channels)
    over[0, 2], at[0, 2] = limit + 150.0, limit
    assert torch.equal(avatar.render(over), avatar.render(at))
