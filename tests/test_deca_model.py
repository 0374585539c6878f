"""DECA's coarse encoder from deca_model.tar (the official layout, random values) and the DECA path of
the mapper objective: a DECA track trains with its pose and expression terms on."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from pvp.checkpoints.layout import CheckpointError
from pvp.models.deca import DecaTracker, face_box, load_deca_encoder, rotation_matrices
from tests.official_layouts import write_deca_model


@pytest.fixture(scope="module")
def deca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    return path, write_deca_model(path)


def test_the_official_file_loads_and_splits_the_code_as_deca(deca_file):
    import torchvision

    path, state = deca_file
    encoder = load_deca_encoder(path)
    crops = torch.rand(2, 3, 224, 224)
    resnet = torchvision.models.resnet50(weights=None)
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    features = resnet.eval()(crops)
    params = F.linear(F.relu(F.linear(features, state["layers.0.weight"], state["layers.0.bias"])),
                      state["layers.2.weight"], state["layers.2.bias"])
    code = encoder(crops)
    # DECA's param_list: shape 100, tex 50, exp 50, pose 6, cam 3, light 27
    assert torch.allclose(code["exp"], params[:, 150:200], atol=1e-5)
    assert torch.allclose(code["pose"], params[:, 200:206], atol=1e-5)
    assert code["light"].shape == (2, 27) and code["shape"].shape == (2, 100)


def test_a_missing_or_foreign_file_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="deca_model.tar.*yfeng95/DECA"):
        load_deca_encoder(tmp_path / "deca_model.tar")
    torch.save({"state_dict": {}}, tmp_path / "other.tar")
    with pytest.raises(CheckpointError, match="no 'E_flame'"):
        load_deca_encoder(tmp_path / "other.tar")


def test_rotation_matrices_are_rodrigues():
    v = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]], dtype=torch.float64)
    assert torch.allclose(rotation_matrices(v), torch.from_numpy(Rotation.from_rotvec(v.numpy()).as_matrix()))


def test_the_tracker_crops_the_face_box_and_reads_deca(deca_file):
    """The crop is DECA's: the landmarks' bounding square scaled 1.25, resized to 224, RGB in [0, 1]."""
    encoder = load_deca_encoder(deca_file[0])
    landmarks = np.array([[[20.0, 30.0], [60.0, 70.0]], [[24.0, 30.0], [64.0, 70.0]]])  # 40 px faces in 128 px
    box = face_box(landmarks, 128)
    assert box == pytest.approx((42 / 128, 50 / 128, 50 / 128))
    tracker = DecaTracker(encoder, box)
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    crop = tracker.crops(image)
    assert crop.shape == (1, 3, 224, 224)
    x0, y0 = round(42 - 25), round(50 - 25)
    expected = F.interpolate((image[:, :, y0:y0 + 50, x0:x0 + 50] + 1) / 2, size=(224, 224), mode="bilinear",
                             align_corners=False)
    assert (crop - expected)[..., 8:-8, 8:-8].abs().mean() < 0.02
    out = tracker(image)
    code = encoder(crop)
    assert torch.equal(out["head_pose"], code["pose"][:, :3]) and torch.equal(out["expression"], code["exp"])
    assert set(out) >= {"head_pose", "pitch", "yaw", "jaw", "expression"}


def _deca_track(track, frames=40, seed=0):
    """A DECA-backend track (no face model; 50 DECA expression coefficients) over a real clip's frames."""
    import dataclasses

    rng = np.random.default_rng(seed)
    sliced = {f.name: getattr(track, f.name)[:frames] for f in dataclasses.fields(track)
              if isinstance(getattr(track, f.name), np.ndarray) and len(getattr(track, f.name)) == len(track)}
    sliced.update(backend="deca", face_model=None, expression=rng.normal(size=(frames, 50)) * 0.5)
    return dataclasses.replace(track, **sliced)


def test_a_deca_track_trains_with_every_loss_term(d3_track, deca_file, tmp_path):
    from pvp.fit.pipeline import FitError, FitInputs, FitJob
    from pvp.fit.presets import PRESETS

    track_file = tmp_path / "deca_track.safetensors"
    _deca_track(d3_track).save(track_file)
    preset = PRESETS["tiny"].with_overrides(prior_steps=4, mapper_steps=2, pivots=4,
                                            **{"objective.optimize_noise": True})
    with pytest.raises(FitError, match="--deca deca_model.tar"):
        FitJob(FitInputs(track_file, tmp_path / "no_deca", preset, progress=False)).run()
    metrics = FitJob(FitInputs(track_file, tmp_path / "avatar", preset, deca=deca_file[0], progress=False)).run()
    assert np.isfinite(metrics["train_psnr"])
    record = json.loads((tmp_path / "avatar" / "work" / "metrics.json").read_text())
    assert {"pose", "expression", "novel_pose"} <= set(record["mapper_training"])
    assert record["losses"]["pose"]["enabled"] and record["losses"]["expression"]["enabled"]
    assert record["losses"]["tracker"] == "deca"
    # the noise maps trained with the mappers are the avatar's
    from safetensors.torch import load_file

    noise = load_file(str(tmp_path / "avatar" / "work" / "noise.safetensors"))
    generator = load_file(str(tmp_path / "avatar" / "generator.safetensors"))
    assert noise and all(torch.equal(generator[k], v) for k, v in noise.items())
