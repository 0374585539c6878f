import cv2
import numpy as np
import torch

from pvp.avatar import Avatar, random_avatar
from pvp.images import load_rgb
from pvp.serve.batch_render import driving_controls, render_track
from pvp.tracking.track import Track


def _short_track(d3_track, n=6):
    return d3_track.select(slice(0, n))


def test_render_track_to_folder_and_video_resumes(d3_track, tmp_path):
    random_avatar(resolution=32, expression_dim=4).save(tmp_path / "av")
    track = _short_track(d3_track)
    track.save(tmp_path / "t.safetensors")
    out = tmp_path / "frames"
    assert render_track(tmp_path / "av", tmp_path / "t.safetensors", out, progress=False) == 6
    files = sorted(out.glob("frame_*.png"))
    assert len(files) == 6
    avatar = Avatar.load(tmp_path / "av")
    ctrl = driving_controls(avatar, Track.load(tmp_path / "t.safetensors"))  # the controls as saved
    # the frame is the avatar's render of its controls, in the same batch (the last bit of a pixel may depend
    # on what else is in the batch)
    assert np.array_equal(load_rgb(files[2]), avatar.render_uint8(torch.from_numpy(ctrl))[2])
    stamp = files[0].stat().st_mtime_ns
    files[3].unlink()
    render_track(tmp_path / "av", tmp_path / "t.safetensors", out, progress=False)
    assert files[3].exists() and files[0].stat().st_mtime_ns == stamp  # kept, not redone
    video = tmp_path / "out.mp4"
    render_track(tmp_path / "av", tmp_path / "t.safetensors", video, progress=False)
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    cap.release()


def test_driving_track_is_renormalised(d3_track, tmp_path):
    avatar = random_avatar(resolution=32, expression_dim=4)
    avatar.meta.stats.mean = [1.0] * 6
    avatar.meta.stats.std = [0.5] * 6
    ctrl = driving_controls(avatar, d3_track, "on")
    assert np.allclose(ctrl[:, 3:].mean(0), 1.0, atol=1e-4) and np.allclose(ctrl[:, 3:].std(0), 0.5, atol=1e-4)
    raw = driving_controls(avatar, d3_track, "off")
    assert not np.allclose(raw[:, 3:].mean(0), 1.0)
