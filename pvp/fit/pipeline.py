"""`pvp fit`, stage by stage. Every stage writes its result atomically under AVATAR/work/; a finished
stage is never redone, and a stage that was interrupted resumes from its last checkpoint (--resume).

Stages: track -> frames (aligned crops) -> pivots -> prior (from scratch, or inversion + pivotal
tuning of a pretrained generator) -> mappers -> the avatar bundle (with held-out metrics)."""
from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pvp.checkpoints import load_generator, save_generator
from pvp.fit.data import build_frames, parse_range, to_tensor
from pvp.fit.inversion import optimize_latents
from pvp.fit.mapper_training import (
    MapperData,
    NoiseMaps,
    downsample,
    drive_range,
    eyes_mouth_masks,
    losses_record,
    train_mappers,
)
from pvp.fit.pivots import select_pivots
from pvp.fit.presets import PRESETS, Preset, format_setting
from pvp.fit.pti import pivotal_tuning
from pvp.fit.scratch_prior import standardized_controls, train_scratch_prior
from pvp.fit.training import dtype_name, render_dtype
from pvp.models.losses import PerceptualLoss, psnr
from pvp.models.mappers import load_mappers, mapper_inputs, save_mappers
from pvp.tracking.align import apply_affine, unit_transform
from pvp.tracking.track import Track, TrackError
from pvp.tracking.tracker import TrackSettings, track_video
from pvp_contract import controls
from pvp_contract.atomic import atomic_path, write_text

log = logging.getLogger("pvp.fit")


class FitError(ValueError):
    """Bad fit input or state; the message names it."""


@dataclass
class FitInputs:
    source: Path  # a video, a folder of images, or a pvp track file
    avatar: Path
    preset: Preset
    prior: Path | None = None
    e4e: Path | None = None
    arcface: Path | None = None
    vgg: Path | None = None
    deca: Path | None = None  # deca_model.tar: DECA tracks' pose and expression terms re-read renders with it
    train_frames: str | None = None
    pivot_method: str = "kmeans"
    resume: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    seed: int = 0

    def settings(self) -> dict:
        """What work/settings.json holds: a resumed fit must be given the same."""
        return {"source": str(self.source), "preset": self.preset.to_json(),
                "prior": str(self.prior) if self.prior else None, "deca": str(self.deca) if self.deca else None,
                "e4e": str(self.e4e) if self.e4e else None, "train_frames": self.train_frames,
                "pivot_method": self.pivot_method, "seed": self.seed}


def settings_changes(previous: dict, current: dict) -> dict[str, object]:
    """The settings a resumed fit was given differently, each with the value it started with: 'preset.FIELD' for a
    preset field, 'preset.FIELD.INNER' for one of a nested field (the objective, the mapper design). A preset field
    that settings written before it existed lack counts as its default: new fields default to what fits ran with
    before them, in a nested field as well; fields removed since count for nothing."""
    defaults = Preset(name="", resolution=0, pivots=0, perceptual="", needs_prior=False).to_json()  # the defaults
    written = previous.get("preset", {})
    changed = {}
    for key, value in current["preset"].items():
        old = written.get(key, defaults.get(key))
        if isinstance(value, dict) and isinstance(old, dict):  # compared on the current fields only
            default = defaults.get(key, {})
            for inner, now in value.items():
                before = old.get(inner, default.get(inner))
                if before != now:
                    changed[f"preset.{key}.{inner}"] = before
        elif old != value:
            changed[f"preset.{key}"] = old
    changed.update({k: previous.get(k) for k, v in current.items() if k != "preset" and previous.get(k) != v})
    return dict(sorted(changed.items()))


def changes_text(changed: dict[str, object]) -> str:
    """What ``settings_changes`` found, as a refusal says it: 'FIELD was OLD, ...'."""
    return ", ".join(f"{name.removeprefix('preset.')} was {old!r}" for name, old in changed.items())


# pvp fit's options (cli.py) for the settings outside the preset's fields; the source is its first argument
SETTING_OPTIONS = {"prior": "--prior", "deca": "--deca", "e4e": "--e4e", "train_frames": "--train-frames",
                   "pivot_method": "--pivots", "seed": "--seed"}


def restoring_arguments(previous: dict, current: dict) -> tuple[list[str], list[str]] | None:
    """How to give a resumed fit back the settings ``previous`` it started with, from the pvp fit arguments that
    gave ``current``: (the arguments to add after those, the options to leave out). The arguments are the options,
    then the ``--set`` items against the preset it started with; the options to leave out are those of settings
    it started without. None on another source."""
    add = []
    started_with = previous.get("preset", {}).get("name")
    if started_with != current["preset"]["name"]:
        if started_with not in PRESETS:
            return None
        add = ["--preset", started_with]
        current = {**current, "preset": PRESETS[started_with].to_json()}
    changed = settings_changes(previous, current)
    options = {name: old for name, old in changed.items() if not name.startswith("preset.")}
    if any(name not in SETTING_OPTIONS for name in options):
        return None
    add += [a for name, old in options.items() if old is not None for a in (SETTING_OPTIONS[name], str(old))]
    leave_out = [SETTING_OPTIONS[name] for name, old in options.items() if old is None]
    add += [a for name, old in changed.items() if name.startswith("preset.")
            for a in ("--set", f"{name.removeprefix('preset.')}={format_setting(old)}")]
    return add, leave_out


def restoring_hint(previous: dict, current: dict) -> str:
    """The refusal's advice: what to add and leave out to continue a fit as it started ('' where nothing can)."""
    restore = restoring_arguments(previous, current)
    if restore is None:
        return ""
    add, leave_out = restore
    steps = [f"add {' '.join(map(shlex.quote, add))} after your arguments"] if add else []
    if leave_out:
        steps.append(f"leave out {' and '.join(leave_out)}")
    return f"{' and '.join(steps)} to continue it as it started, " if steps else ""


def _is_track_file(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        Track.load(path)
        return True
    except TrackError:
        return False


class FitJob:
    def __init__(self, inputs: FitInputs):
        self.x = inputs
        self.work = inputs.avatar / "work"
        self.metrics_path = self.work / "metrics.json"

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        x = self.x
        if not x.source.exists():
            raise FitError(f"{x.source}: no such video, image folder or track file")
        if x.preset.needs_prior and x.prior is None:
            raise FitError(f"preset {x.preset.name!r} fine-tunes a pretrained generator: pass --prior ffhq.pkl or "
                           "stylegan2-ffhq-config-f.pt (NVlabs stylegan2-ada-pytorch or rosinality stylegan2-pytorch "
                           "downloads); the CPU presets 'tiny' and 'small' need none")
        settings_path = self.work / "settings.json"
        settings = x.settings()
        if (self.work / "track.safetensors").is_file():  # a stage finished: the fit has really started
            if not x.resume:
                raise FitError(f"{x.avatar}: a fit already started there; pass --resume to continue it, "
                               "or choose another output directory")
            previous = json.loads(settings_path.read_text()) if settings_path.is_file() else settings
            changed = settings_changes(previous, settings)
            if changed:
                raise FitError(f"{x.avatar}: --resume with different settings ({changes_text(changed)}); "
                               f"{restoring_hint(previous, settings)}"
                               "or choose another output directory")
        self.work.mkdir(parents=True, exist_ok=True)
        write_text(settings_path, json.dumps(settings, indent=1))
        handler = logging.FileHandler(self.work / "fit.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("pvp").addHandler(handler)
        logging.getLogger("pvp").setLevel(logging.INFO)

    @cached_property
    def perceptual(self) -> PerceptualLoss:
        """The preset's perceptual loss, loaded once for every stage (LPIPS-VGG reads a 528 MB file)."""
        return PerceptualLoss(self.x.preset.perceptual, vgg=self.x.vgg).to(self.x.device)

    def _metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.is_file() else {}

    def _record(self, **values) -> None:
        write_text(self.metrics_path, json.dumps({**self._metrics(), **values}, indent=1))

    # -- stages -----------------------------------------------------------------------------------------
    def track(self) -> Track:
        path = self.work / "track.safetensors"
        if path.is_file():
            return Track.load(path)
        if _is_track_file(self.x.source):
            track = Track.load(self.x.source)
            if track.crop_scale != self.x.preset.crop_scale:
                log.warning("%s: crops sized by %s, not by %s as preset %r tracks a video (pvp track --crop-scale): "
                            "the fit uses the track's", self.x.source, track.crop_scale, self.x.preset.crop_scale,
                            self.x.preset.name)
        else:
            log.info("stage track: %s", self.x.source)
            track = track_video(self.x.source, TrackSettings(crop_scale=self.x.preset.crop_scale),
                                progress=self.x.progress)
        track.save(path)
        return Track.load(path)  # the saved values (float32): a resumed fit continues from the same numbers

    def frames(self, track: Track, resolution: int) -> dict[str, np.ndarray]:
        log.info("stage frames: aligned crops at %dpx", resolution)
        return build_frames(track, resolution, self.work / f"frames_{resolution}.safetensors", self.x.progress)

    def training_rows(self, track: Track, frame_index: np.ndarray) -> np.ndarray:
        """Rows of the frames array inside --train-frames (positions in the track)."""
        start, stop = parse_range(self.x.train_frames, len(track))
        wanted = set(int(i) for i in track.frame_index[start:stop])
        rows = np.array([r for r, i in enumerate(frame_index) if int(i) in wanted])
        if len(rows) < 2:
            raise FitError(f"--train-frames {self.x.train_frames!r} leaves {len(rows)} frames with a face; need >= 2")
        return rows

    def pivots(self, track: Track, frame_index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        path = self.work / "pivots.json"
        if path.is_file():
            return np.array(json.loads(path.read_text())["rows"])
        pos = {int(i): k for k, i in enumerate(track.frame_index)}
        tr = np.array([pos[int(frame_index[r])] for r in rows])
        chosen = rows[select_pivots(track.yaw_pitch_roll[tr, :2], track.expression[tr], self.x.preset.pivots,
                                    self.x.pivot_method, self.x.seed)]
        write_text(path, json.dumps({"rows": chosen.tolist(), "frame_index": frame_index[chosen].tolist(),
                                     "method": self.x.pivot_method}))
        log.info("stage pivots: %d pivots (%s)", len(chosen), self.x.pivot_method)
        return chosen

    def prior(self, track: Track, frames: torch.Tensor, frame_index: np.ndarray, rows: np.ndarray,
              pivots: np.ndarray):
        gen_path, lat_path = self.work / "generator.safetensors", self.work / "latents.safetensors"
        if gen_path.is_file() and lat_path.is_file():
            return load_generator(gen_path, self.x.device), load_file(str(lat_path))
        x, device = self.x, self.x.device
        if x.prior is None:
            pos = {int(i): k for k, i in enumerate(track.frame_index)}
            tr = np.array([pos[int(frame_index[r])] for r in rows])
            controls = standardized_controls(track.yaw_pitch_roll[tr, :2], track.jaw_pose[tr], track.expression[tr])
            log.info("stage prior: from scratch on %d frames, %d steps", len(rows), x.preset.prior_steps)
            G, latents, prior_metrics = train_scratch_prior(frames[rows], controls, x.preset,
                                                            self.work / "prior_checkpoint.pt", device, x.resume,
                                                            x.seed, x.progress, frame_numbers=frame_index[rows])
            self._record(prior_training=prior_metrics,
                         prior_render_dtype=dtype_name(render_dtype(x.preset.prior_precision, device)))
            with torch.no_grad():
                frame_w = latents(torch.arange(len(rows), device=device))
            row_of = {int(r): k for k, r in enumerate(rows)}
            pivot_w = frame_w[[row_of[int(p)] for p in pivots]]
        else:
            G, pivot_w = self._tune_pretrained(frames[pivots])
            frame_w = pivot_w.clone()  # only the pivots have latents in a pretrained prior
        with torch.no_grad():
            recon = torch.cat([G.synthesis(pivot_w[i:i + 8], noise_mode="const") for i in range(0, len(pivot_w), 8)])
            targets = frames[pivots].to(device)
            pivot_psnr = psnr(recon, targets)
            pivot_perceptual = torch.cat([self.perceptual(recon[i:i + 8], targets[i:i + 8])
                                          for i in range(0, len(recon), 8)])
        self._record(pivot_psnr_mean=float(pivot_psnr.mean()), pivot_psnr_min=float(pivot_psnr.min()),
                     pivot_perceptual_mean=float(pivot_perceptual.mean()), pivots=len(pivots),
                     training_frames=len(rows))
        log.info("stage prior: pivot reconstructions PSNR %.2f dB (min %.2f)", pivot_psnr.mean(), pivot_psnr.min())
        latents = {"pivot_w": pivot_w.cpu().contiguous(), "frame_w": frame_w.cpu().contiguous(),
                   "pivot_rows": torch.as_tensor(pivots), "train_rows": torch.as_tensor(rows)}
        save_generator(G, gen_path)
        with atomic_path(lat_path) as tmp:
            save_file(latents, str(tmp))
        return G, latents

    def _tune_pretrained(self, targets: torch.Tensor):
        x, device = self.x, self.x.device
        G_orig = load_generator(x.prior, device)
        if G_orig.cfg.resolution != targets.shape[-1]:
            raise FitError(f"{x.prior}: a {G_orig.cfg.resolution}px generator, but the frames are "
                           f"{targets.shape[-1]}px")
        perceptual = self.perceptual
        inv_path = self.work / "inversion.safetensors"
        if inv_path.is_file():
            pivot_w = load_file(str(inv_path))["pivot_w"].to(device)
        else:
            t0 = time.perf_counter()
            if x.e4e:
                from pvp.models.e4e import encode_pivots

                pivot_w = encode_pivots(x.e4e, targets.to(device), G_orig, device)
            else:
                log.info("stage inversion: optimising %d pivots (W then W+)", len(targets))
                pivot_w = optimize_latents(G_orig, targets.to(device), perceptual, x.preset.invert_w_steps,
                                           x.preset.invert_wplus_steps, x.preset.invert_lr, x.preset.invert_batch,
                                           x.preset.invert_micro_batch, progress=x.progress)
            with atomic_path(inv_path) as tmp:
                save_file({"pivot_w": pivot_w.cpu().contiguous()}, str(tmp))
            self._record(inversion_seconds=round(time.perf_counter() - t0, 3))  # of the prior stage's time
        log.info("stage tuning: pivotal tuning on %d pivots", len(targets))
        G, metrics = pivotal_tuning(G_orig, pivot_w, targets.to(device), perceptual, x.preset,
                                    self.work / "pti_checkpoint.pt", x.resume, seed=x.seed, progress=x.progress)
        self._record(tuning=metrics, perceptual_loss=perceptual.kind)
        return G, pivot_w

    def track_positions(self, track: Track, frame_index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        pos = {int(i): k for k, i in enumerate(track.frame_index)}
        return np.array([pos[int(frame_index[r])] for r in rows])

    @staticmethod
    def pivot_jaw_expression(latents: dict, rows: np.ndarray, jaw_expression: torch.Tensor,
                             design) -> torch.Tensor | None:
        """The pivots' own (jaw, expression) rows of ``jaw_expression`` (one per training row), in the order of
        the pivots' latents, for neutral pivots; else None."""
        if not design.neutral_pivots:
            return None
        row_of = {int(r): k for k, r in enumerate(rows)}
        return jaw_expression[[row_of[int(p)] for p in latents["pivot_rows"]]]

    def mappers(self, track: Track, G, latents: dict, frames: torch.Tensor, frame_index: np.ndarray,
                rows: np.ndarray, expression_dim: int):
        path, noise_path = self.work / "mappers.safetensors", self.work / "noise.safetensors"
        x, device, objective = self.x, self.x.device, self.x.preset.objective
        noise = NoiseMaps(G)
        if path.is_file():
            if noise_path.is_file():
                noise.load_state_dict(load_file(str(noise_path), device=str(device)))
            return load_mappers(path)
        tr = self.track_positions(track, frame_index, rows)
        schema = learned_schema(track, tr, expression_dim)
        pitch_yaw, jaw_expr = mapper_inputs(torch.from_numpy(track.controls(schema, tr)))  # as the renderer does
        size = min(frames.shape[-1], objective.loss_resolution)
        masks = torch.from_numpy(eyes_mouth_masks(aligned_landmarks(track, tr, size), size, objective.consistency_mask))
        identity = None
        if x.arcface is not None:
            from pvp.models.arcface import IdentityLoss, load_arcface

            identity = IdentityLoss(load_arcface(x.arcface, device))
        elif x.preset.needs_prior and x.preset.objective.identity > 0:
            raise FitError(f"preset {x.preset.name!r} uses the identity loss: pass --arcface model_ir_se50.pth "
                           "(TreB1eN/InsightFace_Pytorch, as pSp/e4e/PTI distribute it)")
        else:
            log.warning("identity loss off: no --arcface given (allowed by preset %r)", x.preset.name)
        tracker = self.render_tracker(track, tr, size)
        dtype = render_dtype(x.preset.mapper_precision, device)
        perceptual = self.perceptual
        log.info("stage mappers: %d steps on %d frames, %d expression coefficients", x.preset.mapper_steps,
                 len(rows), expression_dim)
        drive_min, drive_max = drive_range(schema)
        targets = torch.cat([downsample(frames[rows[i:i + 32]], size) for i in range(0, len(rows), 32)])
        data = MapperData(pitch_yaw.to(device), jaw_expr.to(device), targets.to(device), masks.to(device),
                          drive_min.to(device), drive_max.to(device))
        mappers, metrics = train_mappers(
            G, latents["pivot_w"].to(device), data, perceptual, x.preset.mapper_steps, x.preset.mapper_batch,
            x.preset.mapper_lr, self.work / "mappers_checkpoint.pt", x.preset.checkpoint_every, x.resume, tracker,
            identity, objective=objective, design=x.preset.mapper_design,
            standardize_inputs=x.preset.standardize_mapper_inputs, lr_schedule=x.preset.lr_schedule, seed=x.seed,
            progress=x.progress, generator_lr=x.preset.mapper_generator_lr, dtype=dtype,
            average_half_life=x.preset.mapper_average_half_life,
            pivot_jaw_expression=self.pivot_jaw_expression(latents, rows, jaw_expr, x.preset.mapper_design))
        self._record(mapper_training=metrics, mapper_render_dtype=dtype_name(dtype),
                     losses=losses_record(objective, perceptual.kind, identity is not None, tracker and track.backend))
        if x.preset.mapper_generator_lr > 0:  # the generator the mappers were trained with, before them
            save_generator(G, self.work / "generator.safetensors")
        if objective.optimize_noise:  # before the mappers: their file marks the stage done
            with atomic_path(noise_path) as tmp:
                save_file({k: v.cpu().contiguous() for k, v in noise.state_dict().items()}, str(tmp))
        save_mappers(mappers, path)
        return mappers

    def render_tracker(self, track: Track, positions: np.ndarray, size: int):
        """What reads the renders for the pose and expression terms: the track's own tracker (MediaPipe's
        landmarks through the differentiable tracker; DECA, as the authors, for a DECA track), or None."""
        device = self.x.device
        if track.face_model is not None:
            from pvp.tracking.differentiable import DifferentiableTracker, aligned_roi

            return DifferentiableTracker(track.face_model, roi=aligned_roi(track, positions)).to(device)
        if track.backend == "deca":
            from pvp.models.deca import DecaTracker, face_box, load_deca_encoder

            if self.x.deca is None:
                raise FitError("a DECA track: the pose and expression terms re-read the renders with DECA; pass "
                               "--deca deca_model.tar (github.com/yfeng95/DECA)")
            box = face_box(aligned_landmarks(track, positions, size), size)
            return DecaTracker(load_deca_encoder(self.x.deca, device), box).to(device)
        log.warning("pose and expression losses off: the %s track has no tracker to read renders", track.backend)
        return None

    def bundle(self, track: Track, G, mappers, frames: torch.Tensor, frame_index: np.ndarray, rows: np.ndarray,
               expression_dim: int) -> Path:
        from pvp import __version__
        from pvp.avatar import Avatar, AvatarMeta, ExpressionStats

        x = self.x
        tr = self.track_positions(track, frame_index, rows)
        schema = learned_schema(track, tr, expression_dim)
        drive = track.controls(schema, tr)[:, controls.FACE_COLUMNS]
        metrics = self._metrics()
        meta = AvatarMeta(schema=schema, resolution=G.cfg.resolution, stats=ExpressionStats.of(drive),
                          name=x.avatar.name, preset=x.preset.name, tracker_backend=track.backend,
                          losses=metrics.get("losses", {}), metrics={}, provenance={
                              "source": str(x.source), "frames": len(track), "train_frames": x.train_frames or ":",
                              "training_frames_used": len(rows), "prior": str(x.prior) if x.prior else "from scratch",
                              "pvp_version": __version__, "preset": x.preset.to_json()})
        face_model = track.face_model
        avatar = Avatar(meta, G, mappers, face_model, {}).to(x.device)
        meta.metrics = {**{k: v for k, v in metrics.items() if k != "losses"}, **self.evaluate(avatar, track, frames,
                                                                                              frame_index, rows)}
        avatar.save(x.avatar)
        log.info("wrote the avatar %s", x.avatar)
        return x.avatar

    def evaluate(self, avatar, track: Track, frames: torch.Tensor, frame_index: np.ndarray, rows: np.ndarray) -> dict:
        """PSNR and SSIM of renders at the tracked controls: training frames and held-out frames (valid
        frames outside --train-frames)."""
        from pvp.models.losses import ssim

        held = np.setdiff1d(np.arange(len(frame_index)), rows)
        out = {}
        for name, sel in (("train", rows), ("heldout", held)):
            if len(sel) == 0:
                continue
            ctrl = track.controls(avatar.meta.schema, self.track_positions(track, frame_index, sel))
            ctrl[:, controls.ROLL] = 0.0  # the aligned crops are already upright
            renders = torch.cat([avatar.render(torch.from_numpy(ctrl[i:i + 32]).float())
                                 for i in range(0, len(sel), 32)]).cpu()
            target = frames[sel]
            out[f"{name}_psnr"] = float(psnr(renders, target).mean())
            out[f"{name}_ssim"] = float(ssim(renders, target).mean())
            out[f"{name}_frames"] = int(len(sel))
        log.info("metrics: %s", ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    def run(self) -> dict:
        self._prepare()
        seconds: dict[str, float] = {}

        def timed(stage, fn, *args):
            t0 = time.perf_counter()
            result = fn(*args)
            seconds[stage] = round(time.perf_counter() - t0, 3)
            return result

        track = timed("track", self.track)
        resolution = self.x.preset.resolution
        if self.x.prior is not None:
            resolution = load_generator(self.x.prior).cfg.resolution
        data = timed("frames", self.frames, track, resolution)
        frames = to_tensor(data["images"])
        rows = self.training_rows(track, data["frame_index"])
        pivots = timed("pivots", self.pivots, track, data["frame_index"], rows)
        G, latents = timed("prior", self.prior, track, frames, data["frame_index"], rows, pivots)
        expression_dim = choose_expression_dim(track, self.x.preset.expression_variance)
        mappers = timed("mappers", self.mappers, track, G, latents, frames, data["frame_index"], rows, expression_dim)
        # stage times of this run (a resumed stage counts only what it did now); bench/fit.py reads them
        self._record(stage_seconds=seconds)
        timed("bundle", self.bundle, track, G, mappers, frames, data["frame_index"], rows, expression_dim)
        self._record(stage_seconds=seconds)
        return json.loads((self.x.avatar / "avatar.json").read_text())["metrics"]


def aligned_landmarks(track: Track, positions: np.ndarray, resolution: int) -> np.ndarray:
    """The tracked 2-D landmarks of these frames in their aligned crops of ``resolution`` pixels."""
    A = unit_transform(track.align_quad[positions]) * resolution
    return apply_affine(A, track.landmarks_2d[positions][:, :, :2].astype(np.float64))


def learned_schema(track: Track, positions: np.ndarray, expression_dim: int) -> dict:
    """The control schema of an avatar trained on these track positions: the ranges it learned, with a
    margin (poses 5 degrees beyond the video, jaw 1 degree, expressions half a standard deviation); the
    renderer clamps controls to them."""
    ypr, jaw_deg = track.yaw_pitch_roll[positions], controls.jaw_degrees(track.jaw_pose[positions])
    expr = track.expression[positions, :expression_dim]
    margin = 5.0
    return controls.schema(expression_dim, (ypr[:, 0].min() - margin, ypr[:, 0].max() + margin),
                           (ypr[:, 1].min() - margin, ypr[:, 1].max() + margin),
                           (min(0.0, jaw_deg[:, 0].min()), jaw_deg[:, 0].max() + 1.0),
                           jaw_lateral_range=(jaw_deg[:, 1].min() - 1.0, jaw_deg[:, 1].max() + 1.0),
                           expression_ranges=list(zip(expr.min(0) - 0.5, expr.max(0) + 0.5)))


def choose_expression_dim(track: Track, variance: float, lo: int = 8) -> int:
    """The leading expression coefficients that hold, with the jaw, ``variance`` (the preset's
    ``expression_variance``) of the pose-free landmark variance, at least ``lo``: the last ones are mostly
    landmark noise."""
    k = track.expression.shape[1]
    if track.face_model is None:
        return k
    cumulative = track.face_model.jaw_explained + np.cumsum(track.face_model.explained)
    return int(min(k, max(lo, int(np.searchsorted(cumulative, variance)) + 1)))
