import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pvp.checkpoints import load_generator
from pvp.fit.pivots import select_pivots
from pvp.fit.presets import PRESETS, apply_settings
from pvp.fit.pti import locality_latents, pivotal_tuning
from pvp.fit.training import step_generator
from pvp.models.losses import PerceptualLoss
from tests.official_layouts import random_generator, write_nvlabs_pkl, write_rosinality_pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pivots_span_the_pose_range(d3_track):
    yp, ex = d3_track.yaw_pitch_roll[:, :2], d3_track.expression
    idx = select_pivots(yp, ex, 20, method="kmeans-nearest")
    assert len(idx) == 20 and len(set(idx)) == 20
    for j in range(2):
        assert yp[idx, j].min() == yp[:, j].min() and yp[idx, j].max() == yp[:, j].max()
    assert len(select_pivots(yp[:7], ex[:7], 200, method="kmeans-nearest")) == 7  # capped by the frame count
    uniform = select_pivots(yp, ex, 10, method="uniform")
    assert uniform[0] == 0 and uniform[-1] == len(yp) - 1 and len(uniform) == 10
    with pytest.raises(ValueError, match="pivot selection"):
        select_pivots(yp, ex, 10, method="random")


def _drift(G_orig, G, pivots, seed=123, n=16):
    gen = step_generator(seed, 0)
    w = locality_latents(G_orig, pivots[torch.randint(len(pivots), (n,), generator=gen)], 30.0, 0.5, gen)
    with torch.no_grad():
        return (G.synthesis(w, noise_mode="none") - G_orig.synthesis(w, noise_mode="none")).abs().mean().item()


def test_authors_pivots_are_one_random_member_of_each_whitened_cluster(d3_track):
    """make_keyframes_expr.py: scipy's whiten (divide by the standard deviation, no centring), K-means, one
    random member per cluster."""
    from sklearn.cluster import KMeans

    yp, ex = d3_track.yaw_pitch_roll[:, :2], d3_track.expression
    idx = select_pivots(yp, ex, 12, method="kmeans", seed=3)
    feats = np.concatenate([yp, ex], 1).astype(np.float64)
    whitened = feats / feats.std(0)
    labels = KMeans(n_clusters=12, n_init=4, random_state=3).fit(whitened).labels_
    assert len(idx) == 12 and sorted(labels[idx]) == list(range(12))  # one per cluster
    assert select_pivots(yp, ex, 12, method="kmeans", seed=4).tolist() != idx.tolist()  # a random member
    assert len(select_pivots(yp[:7], ex[:7], 200)) == 7


def test_locality_regularizer_keeps_far_latents_in_place(tmp_path):
    G_orig = random_generator(resolution=16, w_dim=32)
    targets = torch.tanh(random_generator(resolution=16, w_dim=32, seed=7).synthesis(torch.randn(4, 6, 32)))
    pivots = G_orig.map_z(torch.randn(4, 32))
    preset = PRESETS["tiny"].with_overrides(pti_steps_per_pivot=40, pti_lr=3e-3, locality_weight_l2=1.0,
                                            locality_weight_perceptual=0.0, checkpoint_every=10_000,
                                            pti_batch=2)
    loss = PerceptualLoss("msssim")
    results = {}
    for locality in (False, True):
        G, _ = pivotal_tuning(G_orig, pivots, targets, loss, preset, tmp_path / f"c{locality}.pt", resume=False,
                              locality=locality, progress=False)
        results[locality] = _drift(G_orig, G, pivots)
    assert results[True] < 0.7 * results[False]


def _fit(args, **kw):
    return subprocess.run([sys.executable, "-m", "pvp.cli", "fit", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def d3_track_file(d3_track, tmp_path_factory):
    path = tmp_path_factory.mktemp("track") / "d3.safetensors"
    d3_track.save(path)
    return path


@pytest.mark.parametrize("layout", ["nvlabs", "rosinality"])
def test_tuning_path_with_official_layout_priors(layout, d3_track_file, tmp_path):
    G = random_generator(resolution=32, channels=(32, 32, 32, 16), w_dim=32)
    prior = tmp_path / ("g.pkl" if layout == "nvlabs" else "g.pt")
    (write_nvlabs_pkl if layout == "nvlabs" else write_rosinality_pt)(G, prior)
    out = tmp_path / "avatar"
    r = _fit([d3_track_file, "-o", out, "--prior", prior, "--train-frames", "0:30", "--device", "cpu",
              "--set", "pivots=4", "--set", "invert_w_steps=3", "--set", "invert_wplus_steps=3",
              "--set", "pti_steps_per_pivot=2", "--set", "mapper_steps=5"])
    assert r.returncode == 0, r.stderr[-2000:]
    tuned = load_generator(out / "work" / "generator.safetensors")
    assert tuned.cfg == load_generator(prior).cfg
    assert not torch.equal(tuned.synthesis.b32.conv1.weight, load_generator(prior).synthesis.b32.conv1.weight)
    metrics = json.loads((out / "work" / "metrics.json").read_text())
    assert metrics["pivots"] == 4 and np.isfinite(metrics["pivot_psnr_mean"])
    assert "stage tuning: pivotal tuning on 4 pivots" in (out / "work" / "fit.log").read_text()
    assert np.isfinite(metrics["tuning"]["perceptual"]) and metrics["tuning"]["locality"] > 0  # regularised


def test_fit_killed_during_training_resumes(d3_track_file, tmp_path):
    out = tmp_path / "avatar"
    args = [d3_track_file, "-o", out, "--train-frames", "0:40", "--device", "cpu", "--set", "prior_steps=100",
            "--set", "checkpoint_every=20", "--set", "pivots=6", "--set", "mapper_steps=5"]
    proc = subprocess.Popen([sys.executable, "-m", "pvp.cli", "fit", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "work" / "prior_checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step_at_kill < 100
    again = _fit(args)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = _fit([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (out / "work" / "fit.log").read_text()
    assert "resuming from step" in log
    assert torch.load(ckpt, weights_only=True)["step"] == 100
    assert (out / "work" / "generator.safetensors").is_file()
    changed = _fit([*args[:-4], "--set", "pivots=7", "--set", "mapper_steps=5", "--resume"])
    assert changed.returncode == 2 and "(pivots was 6)" in changed.stderr
    assert "add --set pivots=6 after your arguments to continue it as it started" in changed.stderr


def test_each_stage_renders_in_its_own_precision_and_the_fit_records_it(d3_track_file, tmp_path, monkeypatch):
    import pvp.fit.pipeline as pipeline
    from pvp.fit.pipeline import FitInputs, FitJob

    given, train_mappers = [], pipeline.train_mappers

    def recording(*args, **kwargs):
        given.append(kwargs["dtype"])
        return train_mappers(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_mappers", recording)
    preset = PRESETS["tiny"].with_overrides(prior_steps=2, mapper_steps=1, pivots=4, prior_precision="float32",
                                            mapper_precision="bfloat16")
    FitJob(FitInputs(d3_track_file, tmp_path / "a", preset, train_frames="0:40", progress=False)).run()
    assert given == [torch.bfloat16]
    metrics = json.loads((tmp_path / "a" / "work" / "metrics.json").read_text())
    assert (metrics["prior_render_dtype"], metrics["mapper_render_dtype"]) == ("float32", "bfloat16")


def test_the_seed_given_to_pvp_fit_seeds_the_fit(d3_track_file, tmp_path):
    """Two seeds, two fits: the seed reaches the prior's initialisation and is recorded for a resume."""
    weights = {}
    for seed in (0, 5):
        out = tmp_path / f"seed{seed}"
        r = _fit([d3_track_file, "-o", out, "--train-frames", "0:30", "--device", "cpu", "--seed", seed,
                  "--set", "prior_steps=1", "--set", "pivots=4", "--set", "mapper_steps=1"])
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((out / "work" / "settings.json").read_text())["seed"] == seed
        weights[seed] = load_generator(out / "work" / "generator.safetensors").synthesis.b8.conv1.weight
    assert not torch.equal(weights[0], weights[5])
    r = _fit([d3_track_file, "-o", tmp_path / "bad", "--seed", -1])
    assert r.returncode == 2 and "--seed -1: expected 0 to" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "work" / "settings.json").exists()


def test_a_fit_started_before_a_preset_field_existed_resumes_with_its_default():
    """New preset fields default to what fits ran with before them (the precisions: float32; the objective's
    adversarial term: off), nested ones too; a resume names the preset fields given differently."""
    from pvp.fit.pipeline import settings_changes

    float32 = replace(PRESETS["small"], prior_precision="float32", mapper_precision="float32",
                      crop_scale="ffhq")  # the old defaults
    current = {"source": "clip.mp4", "seed": 0, "preset": float32.to_json()}
    objective_before = {k: v for k, v in current["preset"]["objective"].items() if not k.startswith("adversarial")}
    written_before = {**current, "preset": {**{k: v for k, v in current["preset"].items()
                                               if "precision" not in k and k != "crop_scale"},
                                            "objective": objective_before}}
    assert settings_changes(written_before, current) == {}
    removed_since = {**written_before, "preset": {**written_before["preset"],
                                                  "objective": {**objective_before, "a_removed_term": 1.0}}}
    assert settings_changes(removed_since, current) == {}
    adversarial = {**current, "preset": {**current["preset"], "objective": {**objective_before, "adversarial": 0.5}}}
    assert settings_changes(written_before, adversarial) == {"preset.objective.adversarial": 0.0}
    tiny = {**current, "preset": PRESETS["tiny"].to_json(), "seed": 1}
    tiny_before = {**tiny, "seed": 0, "preset": {**tiny["preset"], "prior_precision": "float32", "prior_steps": 4000}}
    assert settings_changes(tiny_before, tiny) == {"preset.prior_precision": "float32", "preset.prior_steps": 4000,
                                                   "seed": 0}


def test_a_resume_with_other_settings_says_which_arguments_continue_it_as_it_started():
    """A work directory of an older tiny (written before crop_scale and the precisions existed, other terms, another
    seed and channels): the arguments the refusal offers give back exactly the settings it started with; an option
    the fit began without is to be left out."""
    from pvp.fit.pipeline import FitInputs, restoring_arguments, restoring_hint, settings_changes

    started = replace(PRESETS["tiny"], crop_scale="ffhq", prior_precision="float32", mapper_precision="float32",
                      channels=(64, 64, 32, 32, 16), objective=replace(PRESETS["tiny"].objective, sigma=1.0,
                                                                       perturb_jaw=False))
    written = FitInputs(Path("clip.mp4"), Path("a"), started, train_frames="0:200", seed=3).settings()
    written["preset"] = {k: v for k, v in written["preset"].items() if k not in ("crop_scale", "prior_precision",
                                                                               "mapper_precision")}
    now = FitInputs(Path("clip.mp4"), Path("a"), PRESETS["tiny"], train_frames="0:250").settings()
    changed = settings_changes(written, now)
    assert set(changed) == {"preset.crop_scale", "preset.prior_precision", "preset.mapper_precision",
                            "preset.channels", "preset.objective.sigma", "preset.objective.perturb_jaw",
                            "train_frames", "seed"}
    args, leave_out = restoring_arguments(written, now)
    assert leave_out == []
    items = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "crop_scale=ffhq" in items and "channels=64,64,32,32,16" in items
    options = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and a != "--set"}
    assert options == {"--train-frames": "0:200", "--seed": "3"}
    given = FitInputs(Path("clip.mp4"), Path("a"), apply_settings(PRESETS["tiny"], items),
                      train_frames=options["--train-frames"], seed=int(options["--seed"])).settings()
    assert settings_changes(written, given) == {}
    # begun with another preset, one of its fields set: that preset, and the field against it
    small = FitInputs(Path("clip.mp4"), Path("a"), replace(PRESETS["small"], mapper_steps=1500),
                      train_frames="0:250").settings()
    assert restoring_arguments(small, now) == (["--preset", "small", "--set", "mapper_steps=1500"], [])
    paper = FitInputs(Path("clip.mp4"), Path("a"), PRESETS["paper"], train_frames="0:250").settings()
    assert restoring_arguments(now, paper) == (["--preset", "tiny"], [])  # tiny's fields against its own
    assert apply_settings(PRESETS["tiny"], ["channels="]).channels == ()
    # begun without a setting: the option to leave out; on another source: nothing restores it
    all_frames = FitInputs(Path("clip.mp4"), Path("a"), PRESETS["tiny"], seed=2).settings()
    assert restoring_arguments(all_frames, now) == (["--seed", "2"], ["--train-frames"])
    assert restoring_hint(all_frames, now) == ("add --seed 2 after your arguments and leave out --train-frames to "
                                               "continue it as it started, ")
    assert restoring_arguments({**now, "source": "other.mp4"}, now) is None
    assert restoring_hint({**now, "source": "other.mp4"}, now) == ""


def test_paper_preset_needs_a_prior_and_vgg(d3_track_file, tmp_path):
    r = _fit([d3_track_file, "-o", tmp_path / "a", "--preset", "paper"])
    assert r.returncode == 2 and "--prior" in r.stderr
    G = random_generator(resolution=32, channels=(32, 32, 32, 16), w_dim=32)
    write_nvlabs_pkl(G, tmp_path / "g.pkl")
    r = _fit([d3_track_file, "-o", tmp_path / "b", "--preset", "paper", "--prior", tmp_path / "g.pkl",
              "--train-frames", "0:10"])
    assert r.returncode == 2 and "vgg16-397923af.pth" in r.stderr


def test_a_fit_that_fails_at_its_first_stage_can_simply_be_run_again(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"not a video")
    args = [bad, "-o", tmp_path / "avatar", "--device", "cpu"]
    first, second = _fit(args), _fit(args)
    assert first.returncode == second.returncode == 2
    assert "--resume" not in second.stderr  # nothing was done, so there is nothing to resume
    assert second.stderr.strip().splitlines()[-1] == first.stderr.strip().splitlines()[-1]


def test_the_track_stage_crops_as_the_preset_says_and_continues_with_the_saved_values(real_data, tmp_path):
    import cv2

    from pvp.fit.pipeline import FitInputs, FitJob
    from pvp.tracking.track import Track
    from pvp.video import write_video

    cap = cv2.VideoCapture(str(real_data / "lp_d12.mp4"))
    for i in range(12):
        ok, frame = cap.read()
        cv2.imwrite(str(tmp_path / f"f{i:02d}.png"), frame)
    clip = write_video(sorted(tmp_path.glob("f*.png")), 25.0, tmp_path / "clip.mp4")
    job = FitJob(FitInputs(clip, tmp_path / "avatar", PRESETS["tiny"], progress=False))
    job._prepare()
    fresh = job.track()
    resumed = Track.load(tmp_path / "avatar" / "work" / "track.safetensors")  # what a restarted fit reads
    for name in ("yaw_pitch_roll", "jaw_pose", "expression", "landmarks_2d", "align_quad"):
        assert np.array_equal(getattr(fresh, name), getattr(resumed, name)), name
    assert fresh.settings["crop_scale"] == "head"  # tiny's: the crop sized by the head
    per_frame = FitJob(FitInputs(clip, tmp_path / "ffhq", replace(PRESETS["tiny"], crop_scale="ffhq"), progress=False))
    per_frame._prepare()
    ffhq = per_frame.track()
    assert ffhq.settings["crop_scale"] == "ffhq" and not np.allclose(ffhq.align_quad, fresh.align_quad)


def test_a_resume_without_a_checkpoint_says_it_starts_over(tmp_path, caplog):
    import logging

    from pvp.fit.training import run_steps

    net = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="pvp.fit.training"):
        run_steps("prior", 3, lambda i: {"loss": float(i)}, {"net": net}, tmp_path / "ckpt.pt", 50, resume=True,
                  progress=False)
    assert "prior: no checkpoint at" in caplog.text and "starting from step 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pvp.fit.training"):
        run_steps("prior", 5, lambda i: {"loss": float(i)}, {"net": net}, tmp_path / "ckpt.pt", 50, resume=True,
                  progress=False)
    assert "resuming from step 3 of 5" in caplog.text and "run again" in caplog.text


def test_a_resumed_loop_counts_the_seconds_of_every_run(tmp_path, monkeypatch):
    """A stage's "seconds" over its "steps" is the time per step even when the stage was interrupted: a
    resumed run adds its time to the checkpoint's (bench/fit.py and a fit's metrics read the ratio)."""
    from types import SimpleNamespace

    from pvp.fit import training

    clock = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def one_second_step(i, stop_at=None):
        if i == stop_at:
            raise KeyboardInterrupt
        clock[0] += 1.0
        return {"loss": float(i)}

    net, checkpoint = torch.nn.Linear(2, 2), tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):  # checkpointed after step 2, stopped in step 4
        training.run_steps("prior", 5, lambda i: one_second_step(i, stop_at=3), {"net": net}, checkpoint, 2,
                           resume=False, progress=False)
    metrics = training.run_steps("prior", 5, one_second_step, {"net": net}, checkpoint, 2, resume=True,
                                 progress=False)
    assert metrics["steps"] == 5 and metrics["seconds"] == 5.0  # 2 s before the checkpoint, steps 3 to 5 now


def test_a_loop_that_converged_early_says_so_when_resumed(tmp_path):
    """Resuming a finished loop that stopped at its convergence test (pivotal tuning's LPIPS threshold) reports
    the steps it took, not its length: a fit's metrics and bench/fit.py's time per step read them."""
    from pvp.fit.training import run_steps

    net, checkpoint = torch.nn.Linear(2, 2), tmp_path / "ckpt.pt"
    first = run_steps("tuning", 100, lambda i: {"loss": float(i)}, {"net": net}, checkpoint, 50, resume=False,
                      progress=False, converged=lambda: True)
    again = run_steps("tuning", 100, lambda i: {"loss": float(i)}, {"net": net}, checkpoint, 50, resume=True,
                      progress=False, converged=lambda: True)
    assert first["steps"] == again["steps"] == 1


def test_set_overrides_nested_preset_fields():
    from pvp.cli import UserError, _preset_overrides
    from pvp.fit.presets import PRESETS

    tiny = PRESETS["tiny"]
    p = _preset_overrides(tiny, ["objective.novel_pose=0", "objective.optimize_noise=true",
                                 "mapper_design.hull=authors", "mapper_steps=7"])
    assert p.objective.novel_pose == 0.0 and p.objective.optimize_noise is True and p.mapper_steps == 7
    assert p.mapper_design.hull == "authors" and p.mapper_design.leaky_slope == tiny.mapper_design.leaky_slope
    assert p.objective.pose == tiny.objective.pose  # the rest of a nested field stays the preset's
    for bad, message in (("objective.nothing=1", "KEY one of"), ("objective.optimize_noise=maybe", "not a valid bool"),
                         ("mapper_design.hull=convex", "hull 'convex'"), ("prior_adversarial=-1", "0 \\(off\\)"),
                         ("prior_inbetween=2", "share of the batch"), ("crop_scale=mouth", "crop_scale 'mouth'")):
        with pytest.raises(UserError, match=f"^--set {re.escape(repr(bad))}: .*{message}"):  # names the item given
            _preset_overrides(tiny, ["mapper_steps=7", bad])


def test_a_generator_trained_with_the_mappers_is_the_one_saved_for_a_resume(d3_track_file, tmp_path):
    """With mapper_generator_lr the mappers are trained against a generator that changes with them: the
    stage's generator file is rewritten with it (a fit resumed after the mapper stage pairs the two), and the
    avatar holds the same one."""
    from safetensors.torch import load_file

    out = tmp_path / "avatar"
    r = _fit([d3_track_file, "-o", out, "--train-frames", "0:40", "--device", "cpu", "--set", "prior_steps=3",
              "--set", "pivots=6", "--set", "mapper_steps=3", "--set", "mapper_generator_lr=1e-2"])
    assert r.returncode == 0, r.stderr[-2000:]
    stage = load_file(str(out / "work" / "generator.safetensors"))
    bundled = load_file(str(out / "generator.safetensors"))
    assert stage.keys() == bundled.keys() and all(torch.equal(stage[k], bundled[k]) for k in stage)
    prior = torch.load(out / "work" / "prior_checkpoint.pt", weights_only=True)["generator"]
    name = next(k for k in stage if k.startswith("synthesis.") and k.endswith("weight"))
    assert not torch.equal(stage[name], prior[name])  # the prior stage's generator was replaced


def test_the_preset_sets_the_share_of_expression_variance_the_avatar_controls(d3_track_file, tmp_path):
    from pvp.cli import UserError, _preset_overrides
    from pvp.fit.pipeline import FitInputs, FitJob, choose_expression_dim
    from pvp.tracking.track import Track

    track = Track.load(d3_track_file)
    counts = {}
    for variance in (0.95, 0.999):
        out = tmp_path / str(variance)
        preset = PRESETS["tiny"].with_overrides(prior_steps=1, mapper_steps=1, pivots=4, expression_variance=variance)
        FitJob(FitInputs(d3_track_file, out, preset, train_frames="0:30", progress=False)).run()
        schema = json.loads((out / "avatar.json").read_text())["control_schema"]
        counts[variance] = sum(c["group"] == "expression" for c in schema["channels"])
        assert counts[variance] == choose_expression_dim(track, variance)
    assert counts[0.95] < counts[0.999]
    with pytest.raises(UserError, match="expression_variance 0.0: expected a share"):
        _preset_overrides(PRESETS["tiny"], ["expression_variance=0"])


def test_neutral_pivots_take_out_the_pivot_frames_own_jaw_and_expression(d3_track_file, tmp_path):
    from pvp.avatar import Avatar
    from pvp.fit.pipeline import FitInputs, FitJob
    from pvp.models.mappers import mapper_inputs
    from pvp.tracking.track import Track

    out = tmp_path / "avatar"
    preset = apply_settings(PRESETS["tiny"], ["prior_steps=1", "mapper_steps=1", "pivots=4",
                                              "mapper_design.neutral_pivots=true"])
    # frames from 20 on: the pivots' rows in the training frames are not their numbers
    FitJob(FitInputs(d3_track_file, out, preset, train_frames="20:50", progress=False)).run()
    avatar = Avatar.load(out)
    track = Track.load(out / "work" / "track.safetensors")
    position = {int(i): k for k, i in enumerate(track.frame_index)}
    pivots = [position[i] for i in json.loads((out / "work" / "pivots.json").read_text())["frame_index"]]
    own = mapper_inputs(torch.from_numpy(track.controls(avatar.meta.schema, np.array(pivots))))[1].float()
    assert avatar.mappers.cfg.design.neutral_pivots
    assert torch.allclose(avatar.mappers.pivot_jaw_expression, own, atol=1e-6)
