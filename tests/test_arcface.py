"""ArcFace loads a file in the official model_ir_se50.pth layout (TreB1eN Backbone(112, 50, 'ir_se'))."""
import pytest
import torch

from pvp.checkpoints import CheckpointError
from pvp.models.arcface import IdentityLoss, load_arcface
from tests.official_layouts import batch_norm_state, official_e4e_state


def official_arcface_state():
    sd = {k: v for k, v in official_e4e_state().items() if k.startswith(("input_layer.", "body."))}
    batch_norm_state("output_layer.0", 512, sd)
    sd["output_layer.3.weight"] = torch.randn(512, 512 * 7 * 7) * 0.01
    sd["output_layer.3.bias"] = torch.zeros(512)
    batch_norm_state("output_layer.4", 512, sd)
    return sd


def test_official_layout_loads(tmp_path):
    torch.save(official_arcface_state(), tmp_path / "model_ir_se50.pth")
    net = load_arcface(tmp_path / "model_ir_se50.pth")
    with torch.no_grad():
        emb = net(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    loss = IdentityLoss(net)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(loss(img, img), torch.zeros(2), atol=1e-5)
    img.requires_grad_(True)
    loss(img, torch.rand(2, 3, 64, 64) * 2 - 1).sum().backward()
    assert img.grad.abs().sum() > 0


def test_mis_shaped_file_is_refused(tmp_path):
    sd = official_arcface_state()
    sd["output_layer.3.weight"] = torch.zeros(512, 100)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"output_layer.3.weight: expected \[512, 25088\], found \[512, 100\]"):
        load_arcface(tmp_path / "bad.pth")
