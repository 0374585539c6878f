"""`pvp eval`: how faithful an avatar is on frames of a video, the paper's way (section 5.1-5.2).

Renders the avatar at each evaluation frame's tracked controls and compares with the frame's aligned
crop: PSNR, SSIM, LPIPS (when the backbone weights are given) and sharpness, optionally inside the face mask;
re-tracks the renders to measure control accuracy (yaw/pitch/jaw error in degrees, expression error in sd) and
disentanglement (how far the re-tracked head pose moves when only jaw and expression change: each frame
rendered again with the jaw and expression of a training frame).
Three baselines go through the same measures: the nearest pivot (the training pivot closest in pose and
expression, rendered from its latent), the nearest training frame (its real crop, closest in pose and
expression) and the training frame nearest in head pose alone (yaw, pitch).
Sharpness: the variance of the Laplacian of a render over that of the real frame (1: as sharp), for the
evaluated frames and for the controls an animator keys: each slider swept alone over its learned range
(the others at the training frames' medians), and training controls recombined (one frame's head pose,
another's jaw and expression) — these are also the report's samples of the manifold.
Requests beyond the learned ranges are counted (the renderer clamps them; the server reports it per frame),
and the figures are also given over the frames within those ranges and over the clamped ones apart.
Writes metrics.csv (per frame and method), summary.json and report.html (see report.py).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from pvp.avatar import Avatar
from pvp.fit.data import aligned_at, parse_range, to_tensor
from pvp.fit.pivots import pivot_features
from pvp.models.losses import PerceptualLoss, psnr, ssim
from pvp.tracking.track import Track
from pvp.tracking.tracker import TrackSettings, track_video
from pvp_contract import controls
from pvp_contract.atomic import atomic_path, write_text

log = logging.getLogger(__name__)
RETRACKED_COLUMNS = {"yaw": controls.YAW, "pitch": controls.PITCH, "jaw": controls.JAW_OPEN}  # _retrack's angles
METHODS = ("avatar", "nearest_pivot", "nearest_frame", "nearest_pose_frame")
METRICS = ("psnr", "ssim", "lpips", "sharpness", "yaw_err", "pitch_err", "jaw_err", "expr_err", "yaw_shift",
           "pitch_shift", "size_shift")
SWEEP_STEPS = 5


class EvalError(ValueError):
    """Bad evaluation input; the message names it."""


@dataclass
class FrameSet:
    """Aligned crops and tracked controls of some frames of a track."""

    frame_index: np.ndarray  # [N] frame numbers in the video
    images: np.ndarray  # [N, R, R, 3] uint8
    controls: np.ndarray  # [N, C] the avatar's schema (roll 0: crops are upright)
    masks: np.ndarray  # [N, R, R] bool, the face (convex hull of the landmarks)


@dataclass
class Evaluation:
    avatar: str
    video: str
    frames: str
    mask: str | None
    lpips: str | None  # the LPIPS network used, or why none
    eval_set: FrameSet
    train_set: FrameSet
    pivot_positions: np.ndarray | None  # rows of train_set that are pivots
    renders: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [N, R, R, 3] uint8
    per_frame: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> metric -> [N]
    retracked: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> yaw/pitch -> [N]
    samples: np.ndarray | None = None  # renders at recombined training controls: samples of the manifold
    probes: dict = field(default_factory=dict)  # sharpness of slider sweeps and recombined controls
    clamped: dict = field(default_factory=dict)  # requests beyond the learned ranges
    beyond_range: np.ndarray | None = None  # [N] bool: the frame's request was clamped

    def summary_by_range(self) -> dict:
        """The summary over the frames whose requests lie within the learned ranges, and over the others:
        what the avatar does where it learned, apart from where the renderer clamps."""
        beyond = self.beyond_range
        return {part: {"frames": int(rows.sum()), "methods": self.summary(rows) if rows.any() else {}}
                for part, rows in (("within", ~beyond), ("beyond", beyond))}

    def summary(self, rows: np.ndarray | None = None) -> dict:
        """Per method: image metrics' means (and the worst 10% of PSNR), control errors' medians — over
        ``rows`` of the evaluated frames (a boolean mask; default all)."""
        pick = slice(None) if rows is None else rows
        out = {}
        for method, metrics in self.per_frame.items():
            row = {}
            for name, values in metrics.items():
                picked = values[pick]
                finite = picked[np.isfinite(picked)]
                if len(finite):
                    row[name] = float(np.median(finite) if name.endswith(("_err", "_shift")) else finite.mean())
            if "psnr" in row:
                row["psnr_worst10"] = worst_share_mean(metrics["psnr"][pick])
            out[method] = row
        floor = self.retracked.get("ground_truth")
        if floor is not None:  # the tracker's own error on the real frames: no render can score below it
            c = self.eval_set.controls[pick]
            out["ground_truth_retracked"] = {
                f"{name}_err": float(np.median(np.abs(floor[name][pick] - c[:, column])))
                for name, column in RETRACKED_COLUMNS.items()}
        return out


def worst_share_mean(values: np.ndarray, share: float = 0.1) -> float:
    """The mean of the lowest ``share`` of the values (at least one)."""
    ordered = np.sort(values[np.isfinite(values)])
    return float(ordered[:max(1, int(np.ceil(share * len(ordered))))].mean())


def sharpness(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Variance of the Laplacian of each image's grey levels ([N, R, R, 3] uint8 -> [N]), over the pixels of
    ``masks`` when given ([N, R, R] or one [R, R] for all, bool); only ratios of images of one size mean
    something."""
    grey = [cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0 for img in images]
    laplacians = [cv2.Laplacian(g, cv2.CV_64F, ksize=3) for g in grey]
    if masks is None:
        return np.array([lap.var() for lap in laplacians])
    masks = np.broadcast_to(np.asarray(masks, bool), (len(laplacians), *images.shape[1:3]))
    return np.array([lap[m].var() for lap, m in zip(laplacians, masks)])


def range_excess(ctrl: np.ndarray, schema: dict) -> np.ndarray:
    """[N, C]: how far each request lies outside its channel's learned range (0 inside it)."""
    lo, hi = controls.ranges(schema)
    excess = np.maximum(np.maximum(lo - ctrl, ctrl - hi), 0.0)
    excess[:, controls.ROLL] = 0.0  # roll rotates the image: never clamped
    return excess


def clamped_requests(excess: np.ndarray, schema: dict) -> dict:
    """How many requests fall outside the learned ranges (``excess``: range_excess's), and by how much at most
    per channel."""
    names = [c["name"] for c in schema["channels"]]
    return {"frames": int((excess > 0).any(1).sum()), "of": int(len(excess)),
            "max_excess": {names[j]: round(float(excess[:, j].max()), 3) for j in np.flatnonzero(excess.max(0) > 0)}}


def slider_sweeps(schema: dict, neutral: np.ndarray, steps: int = SWEEP_STEPS) -> tuple[list[str], np.ndarray]:
    """Each channel but roll swept alone over its range, the others at ``neutral``: (names, [C', steps, C])."""
    lo, hi = controls.ranges(schema)
    names, sweeps = [], []
    for j, channel in enumerate(schema["channels"]):
        if j == controls.ROLL:
            continue
        ctrl = np.repeat(neutral[None], steps, 0)
        ctrl[:, j] = np.linspace(lo[j], hi[j], steps)
        names.append(channel["name"])
        sweeps.append(ctrl)
    return names, np.stack(sweeps).astype(np.float32)


def recombined_controls(train: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Controls as an animator combines them: one training frame's head pose with another's jaw and expression."""
    rng = np.random.default_rng(seed)
    ctrl = train[rng.integers(len(train), size=n)].copy()
    ctrl[:, controls.FACE_COLUMNS] = train[rng.integers(len(train), size=n)][:, controls.FACE_COLUMNS]
    ctrl[:, controls.ROLL] = 0.0
    return ctrl


def sharpness_probes(avatar: Avatar, train: FrameSet, face_only: bool = False) -> tuple[dict, np.ndarray]:
    """(sharpness ratios against the real training frames' mean: per swept slider, and for recombined
    training controls; the recombined renders). ``face_only``: over the pixels that most training frames' face
    masks cover (the renders have no landmarks of their own; the aligned crops keep the face in place)."""
    region = (train.masks.mean(0) >= 0.5) if face_only else None
    reference = float(sharpness(train.images, region).mean())
    names, sweeps = slider_sweeps(avatar.meta.schema, np.median(train.controls, 0))
    swept = sharpness(_render(avatar, sweeps.reshape(-1, sweeps.shape[-1])), region).reshape(len(names), -1)
    swept /= reference
    samples = _render(avatar, recombined_controls(train.controls, 16))
    per_slider = {name: round(float(v), 3) for name, v in zip(names, swept.mean(1))}
    worst = min(per_slider, key=per_slider.get)
    probes = {"region": "face" if face_only else "crop", "real_training_frames": reference,
              "recombined": float(sharpness(samples, region).mean() / reference),
              "slider_sweeps": float(swept.mean()), "worst_slider": [worst, per_slider[worst]],
              "per_slider": per_slider}
    return probes, samples


def load_frames(track: Track, positions: np.ndarray, avatar: Avatar) -> FrameSet:
    """Aligned crops (at the avatar's resolution), face masks and controls of the given valid positions."""
    sub = track.select(positions)
    res = avatar.meta.resolution
    images, masks, index = [], [], []
    for k, (i, img, A) in enumerate(aligned_at(sub, res)):
        pts = sub.landmarks_2d[k] @ A[:, :2].T + A[:, 2]
        mask = np.zeros((res, res), np.uint8)
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts).astype(np.int32)), 1)
        images.append(img)
        masks.append(mask.astype(bool))
        index.append(i)
    ctrl = sub.controls(avatar.meta.schema)
    ctrl[:, controls.ROLL] = 0.0  # the aligned crops are upright
    return FrameSet(np.array(index), np.stack(images), ctrl, np.stack(masks))


def _valid_positions(track: Track, text: str | None, what: str) -> np.ndarray:
    try:
        start, stop = parse_range(text, len(track), what)
    except ValueError as e:
        raise EvalError(str(e)) from None
    pos = np.arange(start, stop)
    return pos[track.valid[pos]]


def _tracks(avatar_dir: Path, avatar: Avatar, video: Path, progress: bool) -> tuple[Track, Track]:
    """(the avatar's training track, the evaluation video's track): one and the same file when the video
    is the one the avatar was fitted on."""
    fit_track_path = avatar_dir / "work" / "track.safetensors"
    if not fit_track_path.is_file():
        raise EvalError(f"{avatar_dir}: no work/track.safetensors — pvp eval needs an avatar made by pvp fit "
                        "(its training frames give the baselines)")
    fit_track = Track.load(fit_track_path)
    if Path(fit_track.source).resolve() == video.resolve():
        return fit_track, fit_track
    if avatar.face_model is None:
        raise EvalError(f"{avatar_dir}: the avatar has no face model to express {video} in its expression space")
    smoothing = {k: fit_track.settings[k] for k in ("sigma_centre", "sigma_axes") if k in fit_track.settings}
    cropped_alike = TrackSettings(**smoothing, crop_scale=fit_track.crop_scale)
    return fit_track, track_video(video, cropped_alike, face_model=avatar.face_model, progress=progress)


def _render(avatar: Avatar, ctrl: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [avatar.render_uint8(torch.from_numpy(ctrl[i:i + batch]).float()) for i in range(0, len(ctrl), batch)]
    return np.concatenate(out)


def _render_pivots(avatar: Avatar, which: np.ndarray) -> np.ndarray:
    from pvp.models.generator import to_uint8

    w = avatar.mappers.pose.pivots[torch.as_tensor(which)]
    with torch.no_grad():
        img = avatar.generator.synthesis(w.to(avatar.device), noise_mode="const")
    return to_uint8(img).cpu().numpy()


def _features(train: FrameSet, query: np.ndarray, expression_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardised (yaw, pitch, expression) of the training frames and of the queries, as K-means sees them."""
    cols = [controls.YAW, controls.PITCH, *np.arange(expression_dim) + controls.EXPRESSION_COLUMNS.start]
    both = np.concatenate([train.controls[:, cols], query[:, cols]])
    feats = pivot_features(both[:, :2], both[:, 2:])
    return feats[:len(train.controls)], feats[len(train.controls):]


def _retrack(tracker, images: np.ndarray) -> dict[str, np.ndarray]:
    out = {"yaw": [], "pitch": [], "jaw": [], "expression": [], "scale": []}
    with torch.no_grad():
        for i in range(0, len(images), 32):
            r = tracker(to_tensor(images[i:i + 32]))
            out["yaw"].append(np.degrees(r["yaw"].numpy()))
            out["pitch"].append(np.degrees(r["pitch"].numpy()))
            out["jaw"].append(np.degrees(r["jaw"][:, 0].numpy()))
            out["expression"].append(r["expression"].numpy())
            out["scale"].append(r["scale"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _expression_only_shifts(avatar: Avatar, tracker, ctrl: np.ndarray, donors: np.ndarray, retracked: dict,
                            seed: int = 0) -> dict[str, np.ndarray]:
    """|re-tracked yaw/pitch change| (degrees) and |change of the head's size in the image| (% of it) when each
    frame's jaw and expression become a random donor's (the head pose requested stays the same): 0 for a
    perfectly disentangled avatar."""
    face = controls.FACE_COLUMNS
    swapped = ctrl.copy()
    swapped[:, face] = donors[np.random.default_rng(seed).integers(len(donors), size=len(ctrl)), face]
    rt = _retrack(tracker, _render(avatar, swapped))
    return {"yaw_shift": np.abs(rt["yaw"] - retracked["yaw"]), "pitch_shift": np.abs(rt["pitch"] - retracked["pitch"]),
            "size_shift": 100 * np.abs(rt["scale"] / retracked["scale"] - 1)}


def evaluate(avatar_dir, video, frames: str | None = None, mask: str | None = None, vgg=None, alex=None,
             device="cpu", progress: bool = True) -> Evaluation:
    avatar_dir, video = Path(avatar_dir), Path(video)
    if mask not in (None, "face"):
        raise EvalError(f"--mask {mask!r}: the only mask is 'face'")
    if not video.is_file():
        raise EvalError(f"{video}: no such video")
    avatar = Avatar.load(avatar_dir, device)
    fit_track, eval_track = _tracks(avatar_dir, avatar, video, progress)
    train_pos = _valid_positions(fit_track, avatar.meta.provenance.get("train_frames"), "the avatar's train_frames")
    eval_pos = _valid_positions(eval_track, frames, "--frames")
    if not len(eval_pos):
        raise EvalError(f"--frames {frames!r}: no frame with a face in that range of {video}")
    if eval_track is fit_track and np.intersect1d(train_pos, eval_pos).size:
        log.warning("--frames overlaps the training frames: those are not held out")
    log.info("eval: %d frames of %s against %d training frames", len(eval_pos), video.name, len(train_pos))
    ev_set, tr_set = load_frames(eval_track, eval_pos, avatar), load_frames(fit_track, train_pos, avatar)
    lpips_net, lpips_note = None, "not computed: pass --vgg vgg16-397923af.pth or --alex alexnet-owt-7be5be79.pth"
    if vgg or alex:
        lpips_net = PerceptualLoss("lpips-vgg" if vgg else "lpips-alex", vgg=vgg, alex=alex).to(device)
        lpips_note = "vgg" if vgg else "alex"
    result = Evaluation(str(avatar_dir), str(video), frames or ":", mask, lpips_note, ev_set, tr_set, None)

    k = sum(1 for c in avatar.meta.schema["channels"] if c["group"] == "expression")
    train_f, eval_f = _features(tr_set, ev_set.controls, k)
    nearest_frame = np.argmin(((eval_f[:, None] - train_f[None]) ** 2).sum(-1), 1)
    result.renders["avatar"] = _render(avatar, ev_set.controls)
    result.probes, result.samples = sharpness_probes(avatar, tr_set, face_only=mask == "face")
    excess = range_excess(ev_set.controls, avatar.meta.schema)
    result.clamped, result.beyond_range = clamped_requests(excess, avatar.meta.schema), (excess > 0).any(1)
    result.renders["nearest_frame"] = tr_set.images[nearest_frame]
    pose = [controls.YAW, controls.PITCH]
    nearest_pose = np.argmin(((ev_set.controls[:, None, pose] - tr_set.controls[None, :, pose]) ** 2).sum(-1), 1)
    result.renders["nearest_pose_frame"] = tr_set.images[nearest_pose]
    pivots_file = avatar_dir / "work" / "pivots.json"
    if pivots_file.is_file():
        pivot_frames = json.loads(pivots_file.read_text())["frame_index"]
        row_of = {int(f): r for r, f in enumerate(tr_set.frame_index)}
        pivot_rows = np.array([row_of[int(f)] for f in pivot_frames if int(f) in row_of])
        result.pivot_positions = pivot_rows
        nearest = np.argmin(((eval_f[:, None] - train_f[pivot_rows][None]) ** 2).sum(-1), 1)
        result.renders["nearest_pivot"] = _render_pivots(avatar, nearest)
    tracker = None
    if avatar.face_model is not None:
        from pvp.tracking.differentiable import DifferentiableTracker, aligned_roi

        tracker = DifferentiableTracker(avatar.face_model, roi=aligned_roi(fit_track, train_pos))  # as its fit's
        result.retracked["ground_truth"] = _retrack(tracker, ev_set.images)
    gt = to_tensor(ev_set.images)
    face = ev_set.masks if mask == "face" else None
    real_sharpness = sharpness(ev_set.images, face)
    m = torch.from_numpy(face[:, None].astype(np.float32)) if face is not None else None
    for method in METHODS:
        if method not in result.renders:
            continue
        img = to_tensor(result.renders[method])
        row = {"psnr": psnr(img, gt, m).numpy(), "ssim": ssim(img, gt, m).numpy(),
               "sharpness": sharpness(result.renders[method], face) / real_sharpness}
        if lpips_net is not None:
            with torch.no_grad():
                a, b = (img * m, gt * m) if m is not None else (img, gt)
                row["lpips"] = torch.cat([lpips_net(a[i:i + 16].to(device), b[i:i + 16].to(device)).cpu()
                                          for i in range(0, len(a), 16)]).numpy()
        if tracker is not None:
            rt = _retrack(tracker, result.renders[method])
            result.retracked[method] = rt
            row["yaw_err"] = np.abs(rt["yaw"] - ev_set.controls[:, controls.YAW])
            row["pitch_err"] = np.abs(rt["pitch"] - ev_set.controls[:, controls.PITCH])
            row["jaw_err"] = np.abs(rt["jaw"] - ev_set.controls[:, controls.JAW_OPEN])
            requested = ev_set.controls[:, controls.EXPRESSION_COLUMNS][:, :k]
            row["expr_err"] = np.sqrt(((rt["expression"][:, :k] - requested) ** 2).mean(1))
            if method == "avatar":
                row.update(_expression_only_shifts(avatar, tracker, ev_set.controls, tr_set.controls, rt))
        result.per_frame[method] = row
    return result


def write_outputs(result: Evaluation, out_dir, ground_truth: dict | None = None) -> dict[str, Path]:
    """metrics.csv, summary.json and report.html (with its plots) in out_dir. ``ground_truth``: the demo's
    control accuracy against a synthetic clip's known head rotation and jaw (a section of the report)."""
    from pvp.evaluation.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "method", *METRICS, "yaw", "pitch", "jaw_open", "clamped"])
            for method, metrics in result.per_frame.items():
                for i, frame in enumerate(result.eval_set.frame_index):
                    values = [f"{metrics[m][i]:.6g}" if m in metrics else "" for m in METRICS]
                    c = result.eval_set.controls[i]
                    w.writerow([int(frame), method, *values, f"{c[0]:.3f}", f"{c[1]:.3f}", f"{c[3]:.3f}",
                                int(result.beyond_range[i])])
    summary = {"avatar": result.avatar, "video": result.video, "frames": result.frames,
               "evaluated_frames": int(len(result.eval_set.frame_index)), "mask": result.mask,
               "lpips": result.lpips, "methods": result.summary(), "sharpness": result.probes,
               "clamped": result.clamped, "by_range": result.summary_by_range()}
    if ground_truth is not None:
        summary["ground_truth"] = {k: v for k, v in ground_truth.items() if k != "series"}
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    report = write_report(result, summary, out, ground_truth)
    return {"csv": out / "metrics.csv", "summary": out / "summary.json", "report": report}
