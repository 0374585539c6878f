"""Optional DECA backend (the paper's tracker): used when ``decalib`` is importable and its data files
are configured. Faces are found with the embedded MediaPipe mesh (DECA itself expects a FAN crop: a
square around the face scaled 1.25, resized to 224, RGB in [0, 1]); DECA's codedict then gives FLAME's
global rotation, jaw pose and 50 expression coefficients for each frame."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from pvp.tracking.align import smoothed_quads
from pvp.tracking.track import Track
from pvp.tracking.tracker import TrackSettings, detect_landmarks, fit_heads, require_faces
from pvp_contract.geometry import rotation_from_axis_angle, ypr_from_rotation

CROP_SIZE = 224
CROP_SCALE = 1.25
INSTALL_HINT = ("install DECA from github.com/yfeng95/DECA (its 'decalib' package), download deca_model.tar and "
                "FLAME 2020's generic_model.pkl (flame.is.tue.mpg.de, registration) and set their paths in "
                "decalib.utils.config.cfg")


class DecaUnavailable(RuntimeError):
    pass


def load_deca(device):
    try:
        from decalib.deca import DECA
        from decalib.utils.config import cfg
    except ImportError as e:
        raise DecaUnavailable(f"the DECA backend needs the 'decalib' package ({e}); {INSTALL_HINT}") from None
    needed = {"DECA model (cfg.pretrained_modelpath)": getattr(cfg, "pretrained_modelpath", None),
              "FLAME model (cfg.model.flame_model_path)":
                  getattr(getattr(cfg, "model", None), "flame_model_path", None)}
    for what, path in needed.items():
        if not path or not Path(path).is_file():
            raise DecaUnavailable(f"the DECA backend needs the {what}: {path or 'not set'} is missing; {INSTALL_HINT}")
    return DECA(config=cfg, device=str(device))


def face_crop(rgb: np.ndarray, lm2d: np.ndarray) -> np.ndarray:
    """A DECA-style 224x224 crop ([0, 1] float, CHW) of the landmarks' bounding square scaled 1.25."""
    lo, hi = lm2d.min(0), lm2d.max(0)
    centre, size = (lo + hi) / 2, (hi - lo).max() * CROP_SCALE
    s = CROP_SIZE / size
    A = np.array([[s, 0, CROP_SIZE / 2 - s * centre[0]], [0, s, CROP_SIZE / 2 - s * centre[1]]])
    img = cv2.warpAffine(rgb, A, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return img.transpose(2, 0, 1).astype(np.float32) / 255.0


def track_video_deca(path, settings: TrackSettings | None = None, device="cpu", deca=None, batch: int = 16,
                     progress: bool = True) -> Track:
    import torch

    settings = settings or TrackSettings()
    deca = deca or load_deca(device)
    source, indices, lm, counts = detect_landmarks(path, settings, progress=progress)
    valid = ~np.isnan(lm).any(axis=(1, 2))
    require_faces(source, valid)  # the rigid head fit below learns its face model from these frames
    lm2d = lm[..., :2] * np.array([source.width, source.height], dtype=np.float32)
    wanted = {int(i): k for k, i in enumerate(indices) if valid[k]}
    codes: dict[str, list[np.ndarray]] = {"pose": [], "exp": []}
    pending = []

    def flush():
        images = torch.from_numpy(np.stack(pending)).to(device)
        with torch.no_grad():
            codedict = deca.encode(images)
        for key in codes:
            codes[key].append(codedict[key].detach().cpu().numpy().reshape(len(pending), -1))
        pending.clear()

    for i, rgb in source.frames(settings.start, settings.end, settings.stride):
        if i in wanted:
            pending.append(face_crop(rgb, lm2d[wanted[i]]))
            if len(pending) == batch:
                flush()
    if pending:
        flush()
    pose, exp = np.concatenate(codes["pose"]), np.concatenate(codes["exp"])
    if pose.shape[1] != 6 or exp.shape[1] != 50:
        raise ValueError(f"DECA returned pose {pose.shape[1:]} and exp {exp.shape[1:]}, expected (6,) and (50,)")
    n = len(indices)

    def full(values):
        out = np.full((n,) + values.shape[1:], np.nan)
        out[valid] = values
        return out

    R = rotation_from_axis_angle(pose[:, :3])
    _, _, head = fit_heads(lm, valid, source.width, source.height)  # sizes the crop as the embedded tracker's does
    return Track(fps=source.fps / settings.stride, source=str(source.path), backend="deca",
                 image_size=(source.width, source.height), frame_index=indices, valid=valid,
                 confidence=valid.astype(np.float64), landmarks_2d=lm2d,
                 landmarks_3d=np.full(lm.shape, np.nan), rotation=full(pose[:, :3]),
                 yaw_pitch_roll=full(ypr_from_rotation(R)), neck_pose=full(np.zeros((len(pose), 3))),
                 jaw_pose=full(pose[:, 3:]), expression=full(exp), translation=full(head.translation),
                 scale=full(head.scale),
                 align_quad=smoothed_quads(lm2d.astype(np.float64), valid, settings.sigma_centre, settings.sigma_axes,
                                           head_scale=full(head.scale) if settings.crop_scale == "head" else None),
                 events=[{"type": "no_face", "frames": [int(i) for i in indices[~valid]]}] if (~valid).any() else [],
                 settings=asdict(settings))
