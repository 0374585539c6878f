"""The subject's own face model, learned from its video: a canonical (frontal, pose-free) mesh, a
FLAME-like expression space over the pose-removed landmarks, and the closed-jaw reference.

Expression space: PCA of the aligned, pose-removed 468-point mesh, components ordered by variance and
coefficients scaled to unit variance over the video (as FLAME's expression coefficients are, roughly
N(0, 1)). Any other video's landmarks (a driving performance) project into the same space.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pvp.tracking import topology as topo
from pvp_contract.geometry import umeyama

MAX_COMPONENTS = 50  # as DECA's expression code


@dataclass
class HeadFit:
    rotation: np.ndarray  # [N, 3, 3] head rotation in the FLAME frame
    scale: np.ndarray  # [N] pixels per canonical unit
    translation: np.ndarray  # [N, 3] pixels
    posefree: np.ndarray  # [N, 468, 3] landmarks with the rigid motion removed (canonical units)
    residual: np.ndarray  # [N] rms rigid-fit residual over the rigid points, canonical units


@dataclass
class FaceModel:
    canonical: np.ndarray  # [468, 3], interocular distance 1, frontal, origin at the rigid points' centroid
    mean: np.ndarray  # [468, 3] mean pose-free mesh of the video (expression origin)
    components: np.ndarray  # [K, 468, 3] orthonormal directions
    scales: np.ndarray  # [K] standard deviation along each component
    explained: np.ndarray  # [K] fraction of the pose-free variance each component holds
    jaw_reference: np.ndarray  # [2] closed-jaw (opening, lateral) angles of the hinge-to-chin vector, radians

    def fit_head(self, mesh: np.ndarray) -> HeadFit:
        """Rigid similarity fit of meshes [N, >=468, 3] (FLAME-frame pixels) to the canonical face."""
        rig = list(topo.RIGID)
        n = len(mesh)
        R, s, t = np.zeros((n, 3, 3)), np.zeros(n), np.zeros((n, 3))
        free = np.zeros((n, topo.NUM_MESH, 3))
        res = np.zeros(n)
        for i in range(n):
            s[i], R[i], t[i] = umeyama(self.canonical[rig], mesh[i, rig])
            free[i] = (mesh[i, : topo.NUM_MESH] - t[i]) @ R[i] / s[i]
            res[i] = np.sqrt(((free[i, rig] - self.canonical[rig]) ** 2).sum(-1).mean())
        return HeadFit(R, s, t, free, res)

    def expression(self, posefree: np.ndarray) -> np.ndarray:
        """[N, 468, 3] pose-free meshes -> [N, K] unit-variance coefficients."""
        d = (posefree - self.mean).reshape(len(posefree), -1)
        return d @ self.components.reshape(len(self.components), -1).T / self.scales

    def jaw(self, posefree: np.ndarray) -> np.ndarray:
        """FLAME-like jaw pose [N, 3] (axis-angle, radians): opening about X (> 0 opens), lateral about Y."""
        angles = _jaw_angles(posefree)
        return np.stack([self.jaw_reference[0] - angles[:, 0], angles[:, 1] - self.jaw_reference[1],
                         np.zeros(len(posefree))], -1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"face_model.{k}": np.asarray(getattr(self, k), dtype=np.float32) for k in
                ("canonical", "mean", "components", "scales", "explained", "jaw_reference")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FaceModel":
        return cls(**{k: np.asarray(arrays[f"face_model.{k}"], dtype=np.float64) for k in
                      ("canonical", "mean", "components", "scales", "explained", "jaw_reference")})


def _hinge(mesh: np.ndarray) -> np.ndarray:
    return (mesh[..., topo.EAR_RIGHT, :] + mesh[..., topo.EAR_LEFT, :]) / 2


def _jaw_angles(posefree: np.ndarray) -> np.ndarray:
    """[N, 2]: hinge-to-chin vector's angle in the Y-Z plane (opening) and in the X-Z plane (lateral)."""
    v = posefree[:, topo.CHIN] - _hinge(posefree)
    return np.stack([np.arctan2(v[:, 2], -v[:, 1]), np.arctan2(v[:, 0], -v[:, 1])], -1)


def _eye_centres(mesh):
    return mesh[..., list(topo.RIGHT_EYE), :].mean(-2), mesh[..., list(topo.LEFT_EYE), :].mean(-2)


def canonical_frame(mean_mesh: np.ndarray) -> np.ndarray:
    """Orient a mesh anatomically: X from the right to the left eye centre, Y from chin to forehead
    (made orthogonal to X), Z = X x Y out of the face. Returns the mesh in that frame, interocular 1."""
    right, left = _eye_centres(mean_mesh)
    x = left - right
    iod = np.linalg.norm(x)
    x /= iod
    up = mean_mesh[topo.FOREHEAD] - mean_mesh[topo.CHIN]
    y = up - (up @ x) * x
    y /= np.linalg.norm(y)
    basis = np.stack([x, y, np.cross(x, y)], 1)  # columns: canonical axes in mesh coordinates
    centred = mean_mesh - mean_mesh[list(topo.RIGID)].mean(0)
    return centred @ basis / iod


def learn_face_model(mesh: np.ndarray, iterations: int = 4, max_components: int = MAX_COMPONENTS) -> FaceModel:
    """Generalised Procrustes over the rigid points of meshes [N, >=468, 3], then PCA of the residual."""
    if len(mesh) < 2:
        raise ValueError("a face model needs at least 2 frames with a face")
    mesh = mesh[:, : topo.NUM_MESH].astype(np.float64)
    canonical = canonical_frame(mesh[0])
    for _ in range(iterations):
        model = FaceModel(canonical, canonical, np.zeros((0, topo.NUM_MESH, 3)), np.ones(0), np.ones(0), np.zeros(2))
        fit = model.fit_head(mesh)
        canonical = canonical_frame(fit.posefree.mean(0))
    model = FaceModel(canonical, canonical, np.zeros((0, topo.NUM_MESH, 3)), np.ones(0), np.ones(0), np.zeros(2))
    free = model.fit_head(mesh).posefree
    mean = free.mean(0)
    d = (free - mean).reshape(len(free), -1)
    _, sv, vt = np.linalg.svd(d, full_matrices=False)
    k = min(max_components, len(free) - 1, vt.shape[0])
    var = sv**2 / len(free)
    scales = np.sqrt(np.maximum(var[:k], 1e-12))
    angles = _jaw_angles(free)
    gap = np.linalg.norm(free[:, topo.UPPER_LIP_INNER] - free[:, topo.LOWER_LIP_INNER], axis=-1)
    closed = gap <= np.quantile(gap, 0.1)
    return FaceModel(canonical, mean, vt[:k].reshape(k, topo.NUM_MESH, 3), scales, var[:k] / var.sum(),
                     np.median(angles[closed], axis=0))
