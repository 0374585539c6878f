"""Rigid geometry of the head, in the FLAME frame: X to the subject's left (image right when frontal),
Y up, Z out of the face towards the camera; rotations as 3x3 matrices or FLAME axis-angle vectors.

Angles reported in degrees, with the signs of the shared clips' probe: yaw > 0 when the nose points to
image right (rotation about +Y), pitch > 0 when the nose points up (rotation about -X), roll > 0 when the
head tilts clockwise in the image (rotation about -Z); R = Ry(yaw) Rx(-pitch) Rz(-roll).
"""
from __future__ import annotations

import numpy as np


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising |dst - (s R src + t)|^2 for point sets [N, 3]."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    R = u @ sign @ vt
    var = (a**2).sum() / len(src)
    s = float((d * np.diag(sign)).sum() / var)
    return s, R, mu_d - s * R @ mu_s


def rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotation_from_ypr(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    return rot_y(y) @ rot_x(-p) @ rot_z(-r)


def ypr_from_rotation(R: np.ndarray) -> np.ndarray:
    """[..., 3, 3] -> [..., 3] (yaw, pitch, roll) in degrees; inverse of rotation_from_ypr."""
    R = np.asarray(R)
    yaw = np.arctan2(R[..., 0, 2], R[..., 2, 2])
    pitch = np.arcsin(np.clip(R[..., 1, 2], -1.0, 1.0))
    roll = -np.arctan2(R[..., 1, 0], R[..., 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def axis_angle_from_rotation(R: np.ndarray) -> np.ndarray:
    """[..., 3, 3] -> [..., 3] rotation vectors (FLAME's pose parameters), radians."""
    R = np.asarray(R, dtype=np.float64)
    cos = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = np.sin(angle)[..., None]
    small = np.abs(sin) < 1e-6
    scale = np.where(small, 0.5, angle[..., None] / (2 * np.where(small, 1.0, sin)))
    return axis * scale


def rotation_from_axis_angle(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    k = v / np.maximum(angle, 1e-12)
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - np.swapaxes(K, -1, -2)
    a = angle[..., None]
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


def mediapipe_to_flame(lm: np.ndarray, width: int, height: int) -> np.ndarray:
    """MediaPipe normalised landmarks [..., 3] (x right, y down, z away, z in units of width) -> pixels in
    the FLAME frame (X right, Y up, Z towards the camera)."""
    return np.stack([lm[..., 0] * width, -lm[..., 1] * height, -lm[..., 2] * width], axis=-1)
