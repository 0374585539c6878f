"""The e4e encoder loads a file with the official e4e_ffhq_encode.pt layout (written here from the
reference structure: pSp/e4e psp_encoders.py + helpers.py), and a bad file is refused precisely."""
import pytest
import torch

from pvp.checkpoints import CheckpointError
from pvp.models.e4e import encode_pivots, load_e4e
from tests.official_layouts import official_e4e_state, random_generator, rosinality_checkpoint


@pytest.fixture(scope="module")
def e4e_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("e4e") / "e4e_ffhq_encode.pt"
    enc = official_e4e_state()
    dec = rosinality_checkpoint(random_generator(resolution=1024, channels=(4,) * 9, w_dim=512, mapping_layers=1))
    state = {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec["g_ema"].items()}}
    torch.save({"state_dict": state, "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 1024,
                                              "start_from_latent_avg": True},
                "latent_avg": torch.randn(18, 512)}, path)
    return path


def test_official_layout_loads_and_encodes(e4e_file):
    enc, latent_avg = load_e4e(e4e_file)
    ref = torch.load(e4e_file, weights_only=True)
    state = ref["state_dict"]
    assert torch.equal(enc.body[20].res_layer[5].fc2.weight, state["encoder.body.20.res_layer.5.fc2.weight"])
    assert torch.equal(latent_avg, ref["latent_avg"])
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert out.shape == (1, 18, 512) and torch.isfinite(out).all()


def test_encode_pivots_checks_the_prior(e4e_file):
    G = random_generator(resolution=1024, channels=(4,) * 9, w_dim=512, mapping_layers=1)
    w = encode_pivots(e4e_file, torch.rand(2, 3, 64, 64) * 2 - 1, G, "cpu")
    assert w.shape == (2, 18, 512)
    with pytest.raises(CheckpointError, match="encodes 18 W\\+ layers, the prior has 8"):
        encode_pivots(e4e_file, torch.rand(1, 3, 64, 64), random_generator(resolution=32), "cpu")


def test_bad_e4e_file_is_named_precisely(e4e_file, tmp_path):
    ckpt = torch.load(e4e_file, weights_only=True)
    del ckpt["state_dict"]["encoder.latlayer2.bias"]
    ckpt["state_dict"]["encoder.body.3.res_layer.1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_e4e(tmp_path / "bad.pt")
    assert "missing: latlayer2.bias" in str(e.value)
    assert "body.3.res_layer.1.weight: expected [128, 64, 3, 3], found [64, 64, 1, 1]" in str(e.value)
    with pytest.raises(CheckpointError, match="encoder4editing README"):
        load_e4e(tmp_path / "absent.pt")
