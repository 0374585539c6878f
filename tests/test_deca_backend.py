"""The DECA adapter, against a stand-in ``decalib`` that returns codedicts of the official shapes."""
import sys
import textwrap

import numpy as np
import pytest

from pvp.tracking.deca_backend import DecaUnavailable, load_deca, track_video_deca
from pvp.tracking.tracker import TrackSettings, track_video

STANDIN = {
    "decalib/__init__.py": "",
    "decalib/utils/__init__.py": "",
    "decalib/utils/config.py": """
        from types import SimpleNamespace
        cfg = SimpleNamespace(pretrained_modelpath=None, model=SimpleNamespace(flame_model_path=None))
    """,
    "decalib/deca.py": """
        import torch
        class DECA:
            def __init__(self, config=None, device='cpu'):
                self.calls = []
            def encode(self, images):
                assert images.shape[1:] == (3, 224, 224) and 0 <= images.min() and images.max() <= 1
                b = images.shape[0]
                mean = images.mean(dim=(1, 2, 3))  # varies per frame, so frames can be told apart
                pose = torch.zeros(b, 6)
                pose[:, 1] = 0.2          # global: 0.2 rad about +Y (yaw)
                pose[:, 3] = 0.1 + mean   # jaw opening
                exp = mean[:, None] * torch.arange(50.0)[None]
                return {'shape': torch.zeros(b, 100), 'tex': torch.zeros(b, 50), 'exp': exp, 'pose': pose,
                        'cam': torch.ones(b, 3), 'light': torch.zeros(b, 9, 3), 'images': images}
    """,
}


@pytest.fixture
def standin_decalib(tmp_path, monkeypatch):
    for rel, text in STANDIN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "decalib" or m.startswith("decalib.")]:
        del sys.modules[name]


def test_missing_package_or_files_are_named(standin_decalib, tmp_path):
    with pytest.raises(DecaUnavailable, match=r"DECA model \(cfg.pretrained_modelpath\): not set is missing"):
        load_deca("cpu")
    from decalib.utils.config import cfg

    cfg.pretrained_modelpath = str(tmp_path / "deca_model.tar")
    (tmp_path / "deca_model.tar").write_bytes(b"x")
    cfg.model.flame_model_path = str(tmp_path / "generic_model.pkl")
    with pytest.raises(DecaUnavailable, match="generic_model.pkl is missing"):
        load_deca("cpu")
    (tmp_path / "generic_model.pkl").write_bytes(b"x")
    assert load_deca("cpu") is not None


def test_no_decalib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "decalib", None)
    with pytest.raises(DecaUnavailable, match="needs the 'decalib' package"):
        load_deca("cpu")


def test_codedict_maps_onto_the_track(standin_decalib, real_data):
    from decalib.deca import DECA

    track = track_video_deca(real_data / "lp_d3.mp4", TrackSettings(end=12), deca=DECA(), batch=5,
                             progress=False)
    assert track.backend == "deca" and len(track) == 12 and track.valid.all()
    assert np.allclose(track.yaw_pitch_roll[:, 0], np.degrees(0.2), atol=1e-4)
    assert np.allclose(track.rotation, [0, 0.2, 0], atol=1e-6)
    assert track.expression.shape == (12, 50)
    assert np.allclose(track.expression[:, 1] + 0.1, track.jaw_pose[:, 0], atol=1e-5)  # same per-frame mean
    assert np.ptp(track.jaw_pose[:, 0]) > 0
    embedded = track_video(real_data / "lp_d3.mp4", TrackSettings(end=12), progress=False)
    for name in ("scale", "translation", "align_quad"):  # the embedded tracker's rigid fit sizes and places the crop
        assert np.allclose(getattr(track, name), getattr(embedded, name), rtol=1e-4), name
    assert track.settings["crop_scale"] == "head"
