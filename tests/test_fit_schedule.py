"""The fit's training loops: no host sync between logging steps, the fast `paper` schedule's shape against
`paper-exact`, and PTI's per-pivot stop."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pvp.fit.inversion import optimize_latents
from pvp.fit.mapper_training import MapperData, train_mappers
from pvp.fit.presets import PRESETS
from pvp.fit.pti import PivotDraw, pivotal_tuning
from pvp.fit.training import render_dtype, run_steps, step_generator
from pvp.models.losses import PerceptualLoss
from tests.official_layouts import random_generator, random_lpips_vgg

READS = {"item": 0.0, "tolist": None, "numpy": None, "cpu": None, "__bool__": False, "__float__": 0.0,
         "__int__": 0, "__index__": 0}


class HostReads(TorchFunctionMode):
    """Records every transfer that makes the host wait for a GPU, with the training step it happened in: a
    read of a device tensor, and a copy of host values made per call (new_tensor, torch.tensor, indexing
    with a Python list). The loops run on the meta device, whose tensors hold no values: a read is
    answered with a stand-in value (False for a test: a loop goes on), and every transfer is seen. A read
    after a step (its logging) counts as the step's."""

    def __init__(self):
        super().__init__()
        self.step, self.reads = None, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_meta = tensor is not None and tensor.device.type == "meta"
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if on_meta and (name in READS or to_host):
            self.reads.append((self.step, name))
            if name == "tolist":
                return torch.zeros(tensor.shape).tolist()
            if name == "numpy":
                return torch.zeros(tensor.shape).numpy()
            if name == "cpu" or to_host:
                return torch.zeros(tensor.shape, dtype=tensor.dtype)
            return READS[name]
        if _copies_host_values(name, args, kwargs, on_meta):
            self.reads.append((self.step, f"{name} (host values copied)"))
        return func(*args, **kwargs)

    def steps_read(self) -> set:
        return {step for step, _ in self.reads}


def _copies_host_values(name, args, kwargs, on_meta) -> bool:
    if name == "new_tensor" and on_meta:
        return True
    if name in ("tensor", "as_tensor") and str(kwargs.get("device", "")) == "meta":
        return True
    if on_meta and name in ("__getitem__", "__setitem__"):
        return _host_index(args[1])
    if on_meta and name == "index_select":
        return _host_index(args[2] if len(args) > 2 else kwargs.get("index"))
    return False


def _host_index(index) -> bool:
    """An index made of host values: a Python list, or a CPU tensor (copied to the device at each use)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) or (isinstance(p, torch.Tensor) and p.device.type == "cpu" and p.dim() > 0)
               for p in parts)


def _recording(reads: HostReads, step_fn):
    def step(i):
        reads.step = i
        return step_fn(i)
    return step


def _on_meta(monkeypatch, train, log_every=10) -> HostReads:
    """Run ``train()`` (a loop built on run_steps) on the meta device, logging every ``log_every`` steps."""
    reads = HostReads()

    def recorded(name, steps, step_fn, *args, **kw):
        return run_steps(name, steps, _recording(reads, step_fn), *args, **{**kw, "log_every": log_every})

    for module in ("pvp.fit.pti", "pvp.fit.mapper_training", "pvp.fit.scratch_prior"):
        monkeypatch.setattr(f"{module}.run_steps", recorded)
    with reads:
        train()
    return reads


def test_pivotal_tuning_reads_nothing_from_the_device_between_logging_steps(monkeypatch, tmp_path):
    G = random_generator(resolution=16, w_dim=32).to("meta")
    pivots, targets = torch.zeros(12, G.num_ws, 32, device="meta"), torch.zeros(12, 3, 16, 16, device="meta")
    for stop in ("epoch", "pivot"):
        preset = PRESETS["paper"].with_overrides(pti_steps_per_pivot=8, pti_batch=4, pti_stop=stop,
                                                 checkpoint_every=15)
        reads = _on_meta(monkeypatch, lambda: pivotal_tuning(G, pivots, targets, random_lpips_vgg("meta"), preset,
                                                          tmp_path / f"pti_{stop}.pt", resume=False, progress=False))
        # 24 steps: logging every 10th, the checkpoint after step 14, the end
        assert reads.steps_read() == {0, 10, 14, 20, 23}, (stop, reads.reads)


def test_mapper_training_reads_nothing_from_the_device_between_logging_steps(monkeypatch, d3_track, tmp_path):
    """The paper's objective in full: LPIPS, the identity loss, the differentiable tracker's pose and
    expression terms, novel poses, the trained noise maps."""
    from pvp.models.arcface import ArcFace, IdentityLoss
    from pvp.tracking.differentiable import DifferentiableTracker

    G = random_generator(resolution=64, channels=(32, 32, 32, 32, 16), w_dim=32, mapping_layers=2).to("meta")
    n, k = 6, 10
    jaw_expression = torch.zeros(n, 3 + k, device="meta")
    data = MapperData(torch.zeros(n, 2, device="meta"), jaw_expression, torch.zeros(n, 3, 64, 64, device="meta"),
                      torch.ones(n, 1, 64, 64, device="meta"), jaw_expression[0], jaw_expression[0])
    tracker = DifferentiableTracker(d3_track.face_model).to("meta")
    identity = IdentityLoss(ArcFace().eval().requires_grad_(False).to("meta"))
    objective = PRESETS["paper-exact"].objective.__class__(novel_pose=1.0)
    reads = _on_meta(monkeypatch, lambda: train_mappers(
        G, torch.zeros(4, G.num_ws, 32, device="meta"), data, random_lpips_vgg("meta"), steps=12, batch=3, lr=1e-3,
        checkpoint=tmp_path / "m.pt", every=100, resume=False, tracker=tracker, identity=identity,
        objective=objective, standardize_inputs=True, progress=False))
    assert reads.steps_read() == {0, 10, 11}, reads.reads


def test_scratch_prior_and_inversion_read_nothing_from_the_device_between_logging_steps(monkeypatch, tmp_path):
    from pvp.fit.scratch_prior import train_scratch_prior

    frames = torch.zeros(5, 3, 16, 16, device="meta")
    for terms in ({}, {"prior_inbetween": 0.5, "prior_adversarial": 0.1, "prior_detail": 1.0,
                       "prior_detail_energy": 0.5, "prior_precision": "bfloat16"}):
        preset = PRESETS["tiny"].with_overrides(resolution=16, channels=(32, 32, 16), w_dim=32, prior_steps=12,
                                                checkpoint_every=100, **terms)
        reads = _on_meta(monkeypatch, lambda: train_scratch_prior(frames, torch.zeros(5, 4), preset,
                                                               tmp_path / "p.pt", "meta", resume=False,
                                                               progress=False))
        assert reads.steps_read() == {0, 10, 11}, (terms, reads.reads)

    G = random_generator(resolution=16, w_dim=32).to("meta")
    with HostReads() as reads:
        w = optimize_latents(G, frames, random_lpips_vgg("meta"), w_steps=3, wplus_steps=3, lr=0.01, batch=2,
                             progress=False)
    assert w.shape == (5, G.num_ws, 32) and reads.reads == []


def test_paper_takes_a_tenth_of_the_optimiser_steps_of_paper_exact_with_the_same_objective():
    fast, exact = PRESETS["paper"], PRESETS["paper-exact"]
    steps_fast, steps_exact = fast.optimiser_steps(pretrained=True), exact.optimiser_steps(pretrained=True)
    assert steps_exact == {"inversion": 25 * 500, "tuning": 200 * 350, "mappers": 50_000}  # the authors' schedule
    assert all(steps_fast[stage] <= steps_exact[stage] / 10 for stage in steps_exact), steps_fast
    assert exact.pti_batch == exact.mapper_batch == 1 and exact.pti_stop == "epoch"
    for same in ("resolution", "pivots", "perceptual", "objective", "mapper_design", "pivot_selection",
                 "pti_lpips_threshold", "locality_alpha", "locality_weight_l2", "locality_weight_perceptual"):
        assert getattr(fast, same) == getattr(exact, same), same


def test_a_pivot_under_the_threshold_is_left_out_of_the_draw():
    draw = PivotDraw(6, 2, "pivot", 0.1, "cpu")
    draw.update(0, torch.tensor([0, 1, 2, 3]), torch.tensor([0.05, 0.01, 0.09, 0.02]))
    assert {int(i) for s in range(40) for i in draw.draw(step_generator(0, s))} == {4, 5}
    assert not draw.converged()
    draw.update(1, torch.tensor([4, 5]), torch.tensor([0.3, 0.05]))  # one left above: it and one other
    batches = [draw.draw(step_generator(0, s)).tolist() for s in range(40)]
    assert all(4 in b and len(set(b)) == 2 for b in batches)
    draw.update(2, torch.tensor([4]), torch.tensor([0.02]))
    assert draw.converged()


def test_the_epoch_stop_averages_the_last_epoch_of_batches():
    draw = PivotDraw(6, 2, "epoch", 0.1, "cpu")  # an epoch: 3 batches
    for step, loss in enumerate((0.5, 0.05, 0.05)):
        draw.update(step, torch.tensor([0, 1]), torch.tensor([loss, loss]))
    assert not draw.converged()
    draw.update(3, torch.tensor([2, 3]), torch.tensor([0.05, 0.05]))
    assert draw.converged()


def test_tuning_stops_once_every_pivot_is_under_the_threshold(tmp_path):
    G = random_generator(resolution=32, w_dim=32)
    pivots = G.map_z(torch.randn(4, 32))
    targets = torch.rand(4, 3, 32, 32) * 2 - 1
    preset = PRESETS["paper"].with_overrides(pti_batch=4, pti_steps_per_pivot=40, pti_lpips_threshold=10.0)
    lpips_random = random_lpips_vgg("cpu")
    _, metrics = pivotal_tuning(G, pivots, targets, lpips_random, preset, tmp_path / "c.pt", resume=False,
                                progress=False)
    assert metrics["steps"] == 1  # all four drawn at the first step, all under 10, read at its logging
    preset = preset.with_overrides(pti_lpips_threshold=0.0)
    _, metrics = pivotal_tuning(G, pivots, targets, lpips_random, preset, tmp_path / "d.pt", resume=False,
                                progress=False)
    assert metrics["steps"] == 40


def test_inverting_pivots_in_a_batch_or_in_micro_batches_moves_each_latent_as_alone():
    """paper inverts 100 pivots per optimiser step (a tenth of paper-exact's steps), 8 images per pass."""
    G = random_generator(resolution=16, w_dim=32)
    targets = torch.rand(6, 3, 16, 16) * 2 - 1
    loss = PerceptualLoss("msssim")
    whole = optimize_latents(G, targets, loss, 4, 4, 0.01, batch=6, progress=False)
    parts = optimize_latents(G, targets, loss, 4, 4, 0.01, batch=6, micro_batch=4, progress=False)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-4)  # summation order, through Adam
    alone = optimize_latents(G, targets[:1], loss, 4, 4, 0.01, batch=1, progress=False)
    torch.testing.assert_close(whole[:1], alone, rtol=0, atol=1e-4)
    assert not torch.allclose(whole[0], whole[1])  # each its own


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                         (False, False, torch.float32)])
def test_auto_precision_renders_in_bfloat16_only_on_cpus_that_compute_it(monkeypatch, avx512_bf16, amx, expected):
    """A CPU without AVX512-BF16 or AMX emulates bfloat16 slower than float32; GPUs keep float32 (measured so)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert render_dtype("auto", "cpu") == expected
    assert render_dtype("auto", "cuda") == torch.float32
    assert render_dtype("bfloat16", "cuda") == render_dtype("bfloat16", "cpu") == torch.bfloat16
    assert render_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="precision 'half'"):
        render_dtype("half", "cpu")
