import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from pvp.checkpoints import CheckpointError, load_generator, save_generator
from pvp.models.generator import z_from_seed
from tests.official_layouts import (
    random_generator,
    rosinality_checkpoint,
    state_of,
    write_nvlabs_pkl,
    write_rosinality_pt,
)


@pytest.fixture(scope="module")
def G():
    return random_generator(resolution=32, channels=(32, 32, 24, 16), w_dim=32, conv_clamp=256.0, num_fp16_res=2)


def _render(G, seed=3):
    with torch.no_grad():
        return G(z_from_seed(seed, G.cfg.z_dim), truncation_psi=0.7)


def test_rosinality_layout_keys_match_reference(tmp_path):
    """The official config-f g_ema: style.1..8, input.input, conv1, to_rgb1, convs.0..15, to_rgbs.0..7,
    noises.noise_0..16 (reference-notes, rosinality model.py)."""
    G = random_generator(resolution=1024, channels=(4,) * 9, w_dim=8)
    g = rosinality_checkpoint(G)["g_ema"]
    assert sum(k.startswith("noises.") for k in g) == 17
    assert {k.split(".")[1] for k in g if k.startswith("convs.")} == {str(i) for i in range(16)}
    assert {k.split(".")[1] for k in g if k.startswith("to_rgbs.")} == {str(i) for i in range(8)}
    assert g["input.input"].shape == (1, 4, 4, 4) and g["conv1.conv.weight"].shape == (1, 4, 4, 3, 3)
    assert g["to_rgb1.bias"].shape == (1, 3, 1, 1) and g["noises.noise_16"].shape == (1, 1, 1024, 1024)
    torch.save(rosinality_checkpoint(G), tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt")
    assert loaded.cfg.resolution == 1024 and loaded.num_ws == 18


def test_three_formats_give_identical_images(G, tmp_path):
    write_rosinality_pt(G, tmp_path / "g.pt")
    write_nvlabs_pkl(G, tmp_path / "g.pkl")
    save_generator(G, tmp_path / "g.safetensors")
    from_pt = load_generator(tmp_path / "g.pt")
    from_pkl = load_generator(tmp_path / "g.pkl")
    native = load_generator(tmp_path / "g.safetensors")
    ref = _render(G)
    for loaded in (from_pkl, native):
        assert loaded.cfg == G.cfg
        assert torch.equal(_render(loaded), ref)
    # rosinality files carry neither conv_clamp nor fp16 settings: identical at the same clamp
    assert from_pt.cfg.channels == G.cfg.channels and from_pt.cfg.conv_clamp is None
    G_noclamp = random_generator(resolution=32, channels=(32, 32, 24, 16), w_dim=32)
    write_rosinality_pt(G_noclamp, tmp_path / "h.pt")
    write_nvlabs_pkl(G_noclamp, tmp_path / "h.pkl")
    assert torch.equal(_render(load_generator(tmp_path / "h.pt")), _render(load_generator(tmp_path / "h.pkl")))
    assert torch.equal(_render(load_generator(tmp_path / "h.pt")), _render(G_noclamp))


def test_pkl_records_nvlabs_settings(G, tmp_path):
    write_nvlabs_pkl(G, tmp_path / "g.pkl")
    cfg = load_generator(tmp_path / "g.pkl").cfg
    assert cfg.conv_clamp == 256.0 and cfg.num_fp16_res == 2 and cfg.mapping_lr_multiplier == 0.01


def _error(path):
    with pytest.raises(CheckpointError) as e:
        load_generator(path)
    return str(e.value)


def test_rosinality_missing_extra_misshaped(G, tmp_path):
    def mutate(ckpt):
        g = ckpt["g_ema"]
        del g["convs.3.activate.bias"]
        g["convs.9.conv.weight"] = torch.zeros(1)
        g["to_rgbs.1.conv.modulation.weight"] = torch.zeros(5, 32)

    write_rosinality_pt(G, tmp_path / "bad.pt", mutate)
    msg = _error(tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in msg
    assert "missing: convs.3.activate.bias" in msg
    assert "unexpected: convs.9.conv.weight" in msg
    assert "to_rgbs.1.conv.modulation.weight: expected [24, 32], found [5, 32]" in msg


def test_nvlabs_missing_extra_misshaped(G, tmp_path):
    def mutate(data):
        conv1 = state_of(data["G_ema"], "synthesis", "b16", "conv1")
        del conv1["_parameters"]["bias"]
        conv1["_buffers"]["surprise"] = torch.zeros(2)
        state_of(data["G_ema"], "mapping", "fc3")["_parameters"]["weight"] = torch.nn.Parameter(torch.zeros(7, 32))

    write_nvlabs_pkl(G, tmp_path / "bad.pkl", mutate)
    msg = _error(tmp_path / "bad.pkl")
    assert "missing: synthesis.b16.conv1.bias" in msg
    assert "unexpected: synthesis.b16.conv1.surprise" in msg
    assert "mapping.fc3.weight: expected [32, 32], found [7, 32]" in msg


def test_pickles_from_numpy_2_and_protocol_2_load(G, tmp_path):
    def extras(data):  # what training scripts leave in a snapshot: numpy scalars, sets
        data["G_ema"].state["w_avg_beta"] = np.float32(0.995)
        data["augment_pipe"] = None
        data["training_set_kwargs"] = {"xflip": np.bool_(False), "tags": {"ffhq"}}

    write_nvlabs_pkl(G, tmp_path / "p2.pkl", extras, protocol=2)  # names __builtin__.set
    assert b"__builtin__" in (tmp_path / "p2.pkl").read_bytes()
    # numpy 2 pickles its scalars as numpy._core.multiarray.scalar; the rest of the file is the same
    data = (tmp_path / "p2.pkl").read_bytes().replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
    (tmp_path / "np2.pkl").write_bytes(data)
    for name in ("p2.pkl", "np2.pkl"):
        loaded = load_generator(tmp_path / name)
        assert torch.equal(loaded.synthesis.b8.conv1.weight, G.synthesis.b8.conv1.weight)


def test_unexpected_field_types_are_one_clear_error(G, tmp_path):
    def wrong(data):
        data["G_ema"].state["c_dim"] = "none"

    write_nvlabs_pkl(G, tmp_path / "odd.pkl", wrong)
    with pytest.raises(CheckpointError, match=r"odd.pkl: not an NVlabs generator snapshot this loader understands"):
        load_generator(tmp_path / "odd.pkl")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"G_ema": Evil()}, f)
    msg = _error(tmp_path / "evil.pkl")
    assert "refused to load" in msg and "system" in msg
    assert not marker.exists()


def test_embedded_source_is_never_executed(G, tmp_path):
    write_nvlabs_pkl(G, tmp_path / "g.pkl")
    code = ("import os, sys; sys.path.insert(0, '.'); from pvp.checkpoints import load_generator; "
            f"load_generator({str(tmp_path / 'g.pkl')!r}); print(os.environ.get('PVP_PICKLE_SOURCE_RAN', 'no'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "no"


def test_corrupt_and_wrong_files(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04garbage")
    assert "junk.pkl" in _error(tmp_path / "junk.pkl")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert "junk.pt" in _error(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert "'g_ema'" in _error(tmp_path / "other.pt")
    assert "no such file" in _error(tmp_path / "absent.pkl")


def test_rosinality_without_latent_avg_estimates_it(G, tmp_path):
    write_rosinality_pt(G, tmp_path / "g.pt", lambda c: c.pop("latent_avg"))
    loaded = load_generator(tmp_path / "g.pt")
    assert torch.allclose(loaded.mapping.w_avg, G.estimate_w_avg(), atol=1e-5)


def test_generate_cli_reproduces_checkpoint_image(G, tmp_path):
    from pvp.cli import main
    from pvp.images import load_rgb
    from pvp.models.generator import to_uint8

    write_nvlabs_pkl(G, tmp_path / "g.pkl")
    assert main(["generate", "--checkpoint", str(tmp_path / "g.pkl"), "--seed", "3", "--truncation", "0.7",
                 "--out", str(tmp_path / "a.png"), "--device", "cpu"]) == 0
    expected = to_uint8(_render(G, 3))[0].numpy()
    assert np.array_equal(load_rgb(tmp_path / "a.png"), expected)
    assert main(["generate", "--out", str(tmp_path / "r.png"), "--resolution", "64", "--device", "cpu"]) == 0
    assert load_rgb(tmp_path / "r.png").shape == (64, 64, 3)
    assert main(["generate", "--checkpoint", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "x.png")]) == 2


def test_stray_block_beyond_the_resolution_is_unexpected(G, tmp_path):
    def mutate(ckpt):
        ckpt["g_ema"]["convs.9.conv.weight"] = torch.zeros(1, 8, 8, 3, 3)

    write_rosinality_pt(G, tmp_path / "stray.pt", mutate)
    assert "unexpected: convs.9.conv.weight" in _error(tmp_path / "stray.pt")
