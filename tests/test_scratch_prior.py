"""The from-scratch prior's terms between its frames: in-betweens blended at the frame's own time, latents
blended by head pose and face separately, and the discriminator with its differentiable augmentation."""
import numpy as np
import pytest
import torch

from pvp.fit.presets import PRESETS
from pvp.fit.scratch_prior import (
    POSE_COLUMNS,
    FrameLatents,
    inbetween_latents,
    reconstruction_loss,
    train_scratch_prior,
)
from pvp.models.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    diff_augment,
    discriminator_loss,
    generator_adversarial_loss,
)
from pvp.models.losses import PerceptualLoss, detail_energy_l1, laplacian_l1


def _synthesis_weights(G) -> torch.Tensor:
    return torch.cat([p.flatten() for p in G.synthesis.parameters()])


def _latents(controls: torch.Tensor, times=None) -> FrameLatents:
    torch.manual_seed(0)
    latents = FrameLatents(controls, num_ws=3, w_dim=4, times=times)
    torch.nn.init.normal_(latents.residual)
    return latents


def test_inbetweens_blend_two_neighbours_at_the_frames_own_time():
    """Latents linear in time (no residuals): a frame's in-between is its own latent exactly, also where
    frames are missing (the times are the video's frame numbers, not positions)."""
    times = torch.tensor([0.0, 1, 2, 5, 6, 10, 11, 12, 20, 21])
    latents = _latents(times[:, None], times)
    latents.residual.data.zero_()
    idx = torch.arange(len(times)).repeat(20)
    got = inbetween_latents(latents, idx, gap=3, gen=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, latents(idx))
    # and the neighbours are other frames: with residuals the in-between differs from the frame's own latent
    torch.nn.init.normal_(latents.residual)
    got = inbetween_latents(latents, idx, gap=3, gen=torch.Generator().manual_seed(1))
    inner = (idx > 0) & (idx < len(times) - 1)
    assert (got[inner] - latents(idx[inner])).abs().amax((1, 2)).min() > 0


def test_blended_latents_take_head_pose_and_face_each_by_its_own_weight():
    controls = torch.randn(5, 2 + 6)
    latents = _latents(controls)
    i, j = torch.tensor([0, 3]), torch.tensor([4, 1])
    w = latents.blended(i, j, pose=torch.tensor([0.0, 1.0]), face=torch.tensor([1.0, 0.0]))
    for k, (a, b) in enumerate(zip(i, j)):  # one frame's head pose with the other's jaw and expression
        pose_from, face_from = (a, b) if k == 0 else (b, a)
        mixed = torch.cat([controls[pose_from, :POSE_COLUMNS], controls[face_from, POSE_COLUMNS:]])
        expected = latents.base[0] + latents.proj(mixed).view(3, 4) + (latents.residual[a] + latents.residual[b]) / 2
        torch.testing.assert_close(w[k], expected)
    torch.testing.assert_close(latents.blended(i, j, torch.zeros(2), torch.zeros(2)), latents(i))


def test_augmentation_is_reproducible_differentiable_and_cuts_out_a_square():
    images = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    a = diff_augment(images, torch.Generator().manual_seed(3))
    b = diff_augment(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.shape == images.shape and not torch.allclose(a, images)
    a.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # each image loses a square of half its side (cutout 0.5): at least a sixteenth of it is zero
    zero = (a.detach() == 0).all(1).float().mean((1, 2))
    assert (zero >= 1 / 16).all(), zero


@pytest.mark.parametrize("resolution", [16, 64])
def test_discriminator_losses(resolution):
    torch.manual_seed(0)
    D = Discriminator(DiscriminatorConfig(resolution))
    real, fake = torch.rand(3, 3, resolution, resolution), torch.rand(3, 3, resolution, resolution)
    assert D(real).shape == (3,)
    plain, with_r1 = discriminator_loss(D, real, fake, 0.0), discriminator_loss(D, real, fake, 10.0)
    assert torch.isfinite(plain) and with_r1 > plain  # R1 adds the squared gradient norm on the real images
    fake.requires_grad_(True)
    generator_adversarial_loss(D, fake).backward()
    assert fake.grad.abs().sum() > 0


@pytest.mark.parametrize("term", ["prior_adversarial", "prior_detail", "prior_detail_energy"])
def test_each_prior_term_reaches_the_generator(tmp_path, term):
    """One step from the same start, with and without the term: the generator's update differs (a detached
    render, or a term left out of the loss, would leave it as without)."""
    frames = torch.rand(12, 3, 16, 16) * 2 - 1
    weights = []
    for weight in (0.0, 0.5):
        preset = PRESETS["tiny"].with_overrides(resolution=16, channels=(32, 32, 16), w_dim=32, prior_steps=1,
                                                prior_batch=4, **{term: weight})
        G, _, _ = train_scratch_prior(frames, torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), preset,
                                      tmp_path / f"p{weight}.pt", "cpu", resume=False, progress=False)
        weights.append(_synthesis_weights(G))
    assert not torch.equal(*weights)


def test_prior_terms_train_and_checkpoint_the_discriminator(tmp_path):
    frames = torch.rand(12, 3, 16, 16) * 2 - 1
    preset = PRESETS["tiny"].with_overrides(resolution=16, channels=(32, 32, 16), w_dim=32, prior_steps=3,
                                            prior_batch=4, prior_inbetween=0.5, prior_adversarial=0.1, prior_detail=1.0,
                                            prior_detail_energy=0.5, checkpoint_every=2)
    _, _, metrics = train_scratch_prior(frames, torch.randn(12, 5), preset, tmp_path / "p.pt", "cpu", resume=False,
                                        progress=False, frame_numbers=np.arange(12) * 2)
    assert {"rec", "d_loss", "g_adv"} <= set(metrics) and all(np.isfinite(v) for v in metrics.values())
    saved = torch.load(tmp_path / "p.pt", weights_only=True)
    assert {"discriminator", "opt_d"} <= set(saved)


def test_laplacian_l1_weighs_the_finest_detail_as_much_as_a_uniform_shift():
    """A pixel-scale checkerboard of amplitude c and a uniform shift by c both cost c (L2 would weigh them
    alike too, but MS-SSIM and the pooled scales see the checkerboard least); identical images cost 0."""
    a = torch.rand(2, 3, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1.0
    for difference in (0.1 * checker.expand(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.1)):
        torch.testing.assert_close(laplacian_l1(a + difference, a), torch.full((2,), 0.1))
    assert laplacian_l1(a, a).abs().max() == 0


def _small_prior_preset(**kw):
    return PRESETS["tiny"].with_overrides(resolution=16, channels=(32, 32, 16), w_dim=32, prior_batch=4, **kw)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_an_interrupted_adversarial_prior_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, precision):
    """Stopped after its step-2 checkpoint and resumed, the prior ends with the weights of a run never stopped:
    the discriminator and its optimiser come back with the rest (a fresh one would judge differently)."""
    import pvp.fit.scratch_prior as scratch_prior

    frames = torch.rand(12, 3, 16, 16) * 2 - 1
    controls = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    preset = _small_prior_preset(prior_steps=4, prior_adversarial=0.5, checkpoint_every=2, prior_precision=precision)

    whole, _, _ = train_scratch_prior(frames, controls, preset, tmp_path / "whole.pt", "cpu", resume=False,
                                      progress=False)
    run_steps = scratch_prior.run_steps

    def stopped_at_step_3(name, steps, step_fn, *args, **kw):
        def step(i):
            if i == 3:
                raise KeyboardInterrupt
            return step_fn(i)
        return run_steps(name, steps, step, *args, **kw)

    monkeypatch.setattr(scratch_prior, "run_steps", stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_scratch_prior(frames, controls, preset, tmp_path / "stopped.pt", "cpu", resume=False, progress=False)
    monkeypatch.setattr(scratch_prior, "run_steps", run_steps)
    resumed, _, _ = train_scratch_prior(frames, controls, preset, tmp_path / "stopped.pt", "cpu", resume=True,
                                        progress=False)
    assert torch.allclose(_synthesis_weights(resumed), _synthesis_weights(whole), atol=1e-6)


def test_the_prior_renders_in_its_presets_precision_and_keeps_float32_weights(tmp_path):
    frames = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    controls = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    trained = {}
    for precision in ("float32", "bfloat16"):
        preset = _small_prior_preset(prior_steps=3, prior_precision=precision)
        G, latents, metrics = train_scratch_prior(frames, controls, preset, tmp_path / f"{precision}.pt", "cpu",
                                                  resume=False, progress=False)
        assert {p.dtype for p in [*G.parameters(), *latents.parameters()]} == {torch.float32}
        assert np.isfinite(metrics["rec"])
        trained[precision] = _synthesis_weights(G)
    assert not torch.equal(trained["float32"], trained["bfloat16"])


def test_detail_energy_asks_for_detail_where_l2_settles_for_blur():
    """Against a textured image, its 1-pixel shift and its 3x3 blur: L2 prefers the blur (the safe guess at
    detail it cannot place), the detail-energy term the shift (the right detail, slightly out of place)."""
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shifted = torch.roll(target, 1, dims=-1)
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    assert (blurred - target).square().mean() < (shifted - target).square().mean()
    assert (detail_energy_l1(shifted, target) < 0.5 * detail_energy_l1(blurred, target)).all()
    assert torch.equal(detail_energy_l1(target, target), torch.zeros(2))


def test_the_reconstruction_loss_adds_each_detail_term_at_its_own_weight():
    a, b = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(k)) * 2 - 1 for k in (0, 1))
    perceptual = PerceptualLoss("msssim")
    plain = reconstruction_loss(perceptual, a, b)
    both = reconstruction_loss(perceptual, a, b, detail=0.3, detail_energy=2.0)
    expected = plain + 0.3 * laplacian_l1(a, b).mean() + 2.0 * detail_energy_l1(a, b).mean()
    assert torch.allclose(both, expected)
