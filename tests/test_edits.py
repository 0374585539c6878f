import numpy as np
import pytest
import torch

from pvp.avatar import Avatar
from pvp.cli import main
from pvp.edits import EditError, load_direction


@pytest.fixture
def avatar_dir(tmp_path):
    assert main(["avatar", "random", "-o", str(tmp_path / "av"), "--resolution", "64"]) == 0
    return tmp_path / "av"


def test_interfacegan_npy_and_pt(tmp_path):
    np.save(tmp_path / "smile.npy", np.ones((1, 32), np.float32))
    d = load_direction(tmp_path / "smile.npy", num_ws=8, w_dim=32)
    assert d.shape == (8, 32) and torch.all(d == 1)
    torch.save(torch.arange(8 * 32.0).reshape(1, 8, 32), tmp_path / "pose.pt")
    d = load_direction(tmp_path / "pose.pt", num_ws=8, w_dim=32, layers="2:4")
    assert torch.count_nonzero(d[:2]) == 0 and torch.count_nonzero(d[4:]) == 0 and d[2, 5] == 2 * 32 + 5
    with pytest.raises(EditError, match="a 32-d direction; this avatar's latents are 512-d"):
        load_direction(tmp_path / "smile.npy", num_ws=18, w_dim=512)


def test_ganspace_components(tmp_path):
    torch.save({"mean": torch.zeros(1, 32), "comp": torch.randn(80, 1, 32), "std": torch.rand(80)},
               tmp_path / "ffhq_pca.pt")
    pca = torch.load(tmp_path / "ffhq_pca.pt")
    d = load_direction(tmp_path / "ffhq_pca.pt", num_ws=8, w_dim=32, component=46, layers="4:5")
    assert torch.allclose(d[4], pca["comp"][46, 0] * pca["std"][46]) and torch.count_nonzero(d[5:]) == 0
    with pytest.raises(EditError, match="--component"):
        load_direction(tmp_path / "ffhq_pca.pt", num_ws=8, w_dim=32)


def test_add_list_and_discover_change_the_render(avatar_dir, tmp_path, capsys):
    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32))
    assert Avatar.load(avatar_dir).mappers.cfg.num_ws == 10
    assert main(["edits", "add", str(avatar_dir), "tint", str(tmp_path / "d.npy")]) == 0
    assert main(["edits", "discover", str(avatar_dir), "--count", "3"]) == 0
    avatar = Avatar.load(avatar_dir)
    assert avatar.edit_names == ["tint", "pc00", "pc01", "pc02"]
    ctrl = torch.zeros(1, avatar.num_channels)
    base = avatar.render(ctrl)
    for name in avatar.edit_names:
        edited = avatar.render(ctrl, avatar.edit_vector({name: 2.0}))
        assert not torch.allclose(edited, base), name
    pc = avatar.edit_directions[1]
    assert torch.count_nonzero(pc[:8]) == 0  # discovered directions leave the rig's layers alone
    assert main(["edits", "list", str(avatar_dir)]) == 0
    assert "tint" in capsys.readouterr().out
    assert main(["edits", "add", str(avatar_dir), "bad name!", str(tmp_path / "d.npy")]) == 2
