"""The e4e encoder loads a file with the official e4e_ffhq_encode.pt layout (written here from the
reference structure: pSp/e4e psp_encoders.py + helpers.py), and a bad file is refused precisely."""
import pytest
import torch

from pvp_server.checkpoints import CheckpointError
from pvp_server.e4e import encode_pivots, load_e4e
from tests.official_layouts import random_generator, rosinality_checkpoint


def _bn(prefix, c, sd):
    sd.update({f"{prefix}.weight": torch.rand(c) + 0.5, f"{prefix}.bias": torch.randn(c) * 0.1,
               f"{prefix}.running_mean": torch.randn(c) * 0.1, f"{prefix}.running_var": torch.rand(c) + 0.5,
               f"{prefix}.num_batches_tracked": torch.tensor(1000)})


def official_e4e_state(num_ws=18):
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * (2.0 / (shape[1] * (shape[2] if len(shape) > 2 else 1))) ** 0.5

    sd = {"input_layer.0.weight": w(64, 3, 3, 3), "input_layer.2.weight": torch.full((64,), 0.25)}
    _bn("input_layer.1", 64, sd)
    unit = 0
    for in_ch, depth, n in ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)):  # get_blocks(50)
        for k in range(n):
            c_in = in_ch if k == 0 else depth
            p = f"body.{unit}"
            if c_in != depth:
                sd[f"{p}.shortcut_layer.0.weight"] = w(depth, c_in, 1, 1)
                _bn(f"{p}.shortcut_layer.1", depth, sd)
            _bn(f"{p}.res_layer.0", c_in, sd)
            sd[f"{p}.res_layer.1.weight"] = w(depth, c_in, 3, 3)
            sd[f"{p}.res_layer.2.weight"] = torch.full((depth,), 0.25)
            sd[f"{p}.res_layer.3.weight"] = w(depth, depth, 3, 3)
            _bn(f"{p}.res_layer.4", depth, sd)
            sd[f"{p}.res_layer.5.fc1.weight"] = w(depth // 16, depth, 1, 1)
            sd[f"{p}.res_layer.5.fc2.weight"] = w(depth, depth // 16, 1, 1)
            unit += 1
    for i in range(num_ws):
        spatial = 16 if i < 3 else 32 if i < 7 else 64
        for j in range({16: 4, 32: 5, 64: 6}[spatial]):
            sd[f"styles.{i}.convs.{2 * j}.weight"] = w(512, 512, 3, 3)
            sd[f"styles.{i}.convs.{2 * j}.bias"] = torch.zeros(512)
        sd[f"styles.{i}.linear.weight"] = torch.randn(512, 512, generator=g)
        sd[f"styles.{i}.linear.bias"] = torch.zeros(512)
    sd.update({"latlayer1.weight": w(512, 256, 1, 1), "latlayer1.bias": torch.zeros(512),
               "latlayer2.weight": w(512, 128, 1, 1), "latlayer2.bias": torch.zeros(512)})
    return sd


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
    assert torch.equal(enc.body[20].res_layer[5].fc2.weight, ref["state_dict"]["encoder.body.20.res_layer.5.fc2.weight"])
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
