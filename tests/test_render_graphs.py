import numpy as np
import pytest
import torch

from pvp.avatar import random_avatar
from pvp.serve.graphs import BucketRenderer, bucket_for, buckets_up_to, graphs_unavailable, pad_rows
from pvp.serve.render_service import FrameJob, RenderService


@pytest.fixture(scope="module")
def avatar():
    return random_avatar(resolution=32, expression_dim=4)


def _controls(avatar, n, seed=0):
    """n random controls inside the avatar's ranges; every other frame with a head roll, the rest with none."""
    lo, hi = avatar.ctrl_min, avatar.ctrl_max
    ctrl = lo + (hi - lo) * torch.rand(n, len(lo), generator=torch.Generator().manual_seed(seed))
    ctrl[::2, 2] = 0.0  # head_roll
    return ctrl


def assert_same_frames(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding that depends on the batch size (a rare pixel off by one level)."""
    diff = np.abs(a.astype(int) - b)
    assert a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_buckets_and_padding():
    assert buckets_up_to(16) == (1, 2, 4, 8, 16) and buckets_up_to(12) == (1, 2, 4, 8, 12)
    assert buckets_up_to(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8, 12)) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="largest batch bucket"):
        bucket_for(13, (1, 2, 4, 8, 12))
    t = torch.arange(6.0).reshape(3, 2)
    assert pad_rows(t, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert pad_rows(t, 3) is t


def test_capturable_render_gives_the_eager_images(avatar):
    """The graph path's computation (no host synchronisation) on the CPU: the same images; a frame without
    roll is unchanged by the rotation whatever else is in its batch."""
    ctrl = _controls(avatar, 5)
    eager = avatar.render(ctrl)
    assert torch.equal(avatar.render(ctrl, capturable=True), eager)
    unrolled = ctrl.clone()
    unrolled[:, 2] = 0.0
    assert torch.equal(eager[::2], avatar.render(unrolled)[::2])
    assert not torch.equal(eager[1::2], avatar.render(unrolled)[1::2])


def test_buckets_pad_and_return_the_requested_frames(avatar, monkeypatch):
    renderer = BucketRenderer(avatar, buckets=(1, 2, 4, 8), graphs=False)
    sizes = []
    render = type(avatar).render

    def recorded(self, c, *args, **kwargs):
        sizes.append(len(c))
        return render(self, c, *args, **kwargs)

    monkeypatch.setattr(type(avatar), "render", recorded)
    ctrl = _controls(avatar, 3)
    frames = renderer.render_uint8(ctrl)
    assert sizes == [4]
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    assert_same_frames(frames, avatar.render_uint8(ctrl))
    sizes.clear()
    renderer.warm_up()
    assert sizes == [1, 2, 4, 8]


def test_cpu_service_renders_eagerly_and_graphs_say_why_not(avatar):
    reason = graphs_unavailable(avatar.device)
    assert reason is not None and "CUDA" in reason
    service = RenderService(avatar)
    assert service.graphs is None
    with pytest.raises(ValueError, match="CUDA graphs need"):
        RenderService(avatar, graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        BucketRenderer(avatar, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_replay_matches_eager_and_follows_generator_changes():
    avatar = random_avatar(resolution=32, expression_dim=4).cuda()
    service = RenderService(avatar, max_batch=4)
    assert service.graphs is not None
    ctrl = _controls(avatar, 3).cuda()
    jobs = [FrameJob(c.tolist(), {}, "rgb8", None, 90) for c in ctrl]
    assert_same_frames(service.render_rgb(jobs), avatar.render_uint8(ctrl))
    assert set(service.graphs._captured) == {4}
    with torch.no_grad():
        for name, buf in avatar.generator.named_buffers():
            if name.endswith("noise_const"):
                buf.copy_(torch.randn_like(buf) * 3)
    assert_same_frames(service.render_rgb(jobs), avatar.render_uint8(ctrl))
