"""Track a video: landmarks per frame (a backend), then head pose, jaw, expression and the FFHQ crop."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from pvp.tracking.align import smoothed_quads
from pvp.tracking.face_model import FaceModel, learn_face_model
from pvp.tracking.track import Track
from pvp.video import VideoError, open_video
from pvp_contract.geometry import axis_angle_from_rotation, mediapipe_to_flame, ypr_from_rotation

log = logging.getLogger(__name__)


class NoFaceError(VideoError):
    """No face anywhere in the input."""


CROP_SCALES = ("head", "ffhq")


@dataclass
class TrackSettings:
    start: int = 0
    end: int | None = None
    stride: int = 1
    sigma_centre: float = 1.0  # temporal Gaussian on the crop centre (frames)
    sigma_axes: float = 3.0  # temporal Gaussian on the crop's axes (frames)
    residual_for_zero_confidence: float = 0.1  # rigid-fit rms residual (interocular units) that means "no face"
    crop_scale: str = "head"  # the crop's size: "head" (the rigid head's scale) or "ffhq" (each frame's eyes and mouth)

    def __post_init__(self):
        if self.crop_scale not in CROP_SCALES:
            raise ValueError(f"crop_scale {self.crop_scale!r}: expected one of {', '.join(CROP_SCALES)}")


def detect_landmarks(path, settings: TrackSettings, landmarker=None, progress: bool = True):
    """Run a landmark backend over the frames. Returns (source, frame indices, [N, 478, 3] normalised
    landmarks with NaN where no face, faces seen per frame)."""
    from pvp.tracking.mediapipe_backend import MediaPipeLandmarker

    source = open_video(path)
    landmarker = landmarker or MediaPipeLandmarker()
    indices, landmarks, counts = [], [], []
    total = None
    if source.frame_count:
        total = len(range(settings.start, min(settings.end or source.frame_count, source.frame_count), settings.stride))
    for i, rgb in tqdm(source.frames(settings.start, settings.end, settings.stride), total=total, unit="frame",
                       desc=f"track {source.path.name}", disable=not progress):
        lm, n = landmarker(rgb)
        indices.append(i)
        counts.append(n)
        landmarks.append(lm)
    if not indices:
        raise VideoError(f"{source.path}: no frames in the range start={settings.start} end={settings.end}")
    n_points = next((len(lm) for lm in landmarks if lm is not None), 478)
    stacked = np.stack([lm if lm is not None else np.full((n_points, 3), np.nan, np.float32) for lm in landmarks])
    return source, np.array(indices), stacked, np.array(counts)


def require_faces(source, valid: np.ndarray, face_model: FaceModel | None = None) -> None:
    """A face in some frame, and in two at least where the face model is to be learned from them."""
    if not valid.any():
        raise NoFaceError(f"{source.path}: no face found in any of the {len(valid)} frames read")
    if face_model is None and valid.sum() < 2:
        raise NoFaceError(f"{source.path}: a face was found in only one frame; at least 2 are needed")


def fit_heads(lm: np.ndarray, valid: np.ndarray, width: int, height: int, face_model: FaceModel | None = None):
    """Normalised landmarks [N, L, 3] -> (the FLAME-frame mesh [N, L, 3], the face model (learned from the valid
    frames unless given), its rigid fit to the valid frames)."""
    mesh = mediapipe_to_flame(lm.astype(np.float64), width, height)
    model = face_model or learn_face_model(mesh[valid])
    return mesh, model, model.fit_head(mesh[valid])


def controls_from_landmarks(lm: np.ndarray, valid: np.ndarray, width: int, height: int,
                            face_model: FaceModel | None, settings: TrackSettings):
    """Normalised landmarks [N, L, 3] -> per-frame arrays of a Track, and the face model."""
    n = len(lm)
    lm2d = lm[..., :2] * np.array([width, height], dtype=np.float32)
    mesh, model, fit = fit_heads(lm, valid, width, height, face_model)

    def full(values, fill=np.nan):
        out = np.full((n,) + values.shape[1:], fill, dtype=np.float64)
        out[valid] = values
        return out

    confidence = np.clip(1 - fit.residual / settings.residual_for_zero_confidence, 0, 1)
    arrays = dict(
        valid=valid, confidence=full(confidence, 0.0), landmarks_2d=lm2d, landmarks_3d=mesh,
        rotation=full(axis_angle_from_rotation(fit.rotation)), yaw_pitch_roll=full(ypr_from_rotation(fit.rotation)),
        neck_pose=full(np.zeros((int(valid.sum()), 3))), jaw_pose=full(model.jaw(fit.posefree)),
        expression=full(model.expression(fit.posefree)), translation=full(fit.translation), scale=full(fit.scale),
        align_quad=smoothed_quads(lm2d.astype(np.float64), valid, settings.sigma_centre, settings.sigma_axes,
                                  head_scale=full(fit.scale) if settings.crop_scale == "head" else None))
    return arrays, model


def track_video(path, settings: TrackSettings | None = None, face_model: FaceModel | None = None,
                landmarker=None, progress: bool = True) -> Track:
    """Track one face through a video. ``face_model`` (another track's) expresses this video in that
    subject's expression space, as a driving performance must be."""
    settings = settings or TrackSettings()
    source, indices, lm, counts = detect_landmarks(path, settings, landmarker, progress)
    valid = ~np.isnan(lm).any(axis=(1, 2))
    require_faces(source, valid, face_model)
    arrays, model = controls_from_landmarks(lm, valid, source.width, source.height, face_model, settings)
    events = []
    if (~valid).any():
        events.append({"type": "no_face", "frames": [int(i) for i in indices[~valid]]})
        log.warning("%s: no face in %d of %d frames (marked invalid)", source.path, (~valid).sum(), len(valid))
    multi = indices[counts > 1]
    if len(multi):
        events.append({"type": "several_faces", "frames": [int(i) for i in multi],
                       "kept": "the face followed from frame to frame"})
        log.warning("%s: %d frames show more than one face; the followed face was kept", source.path, len(multi))
    return Track(fps=source.fps / settings.stride, source=str(source.path), backend="mediapipe",
                 image_size=(source.width, source.height), frame_index=indices, face_model=model, events=events,
                 settings=asdict(settings), **arrays)
