"""The subject's own face model, learned from its video: a canonical (frontal, pose-free) mesh, a
FLAME-like expression space over the pose-removed landmarks, and the closed-jaw reference.

Expression space: PCA of the aligned, pose-removed 468-point mesh once the jaw's part is taken out of it,
components ordered by variance and coefficients scaled to unit variance over the video (as FLAME's
expression coefficients are, roughly N(0, 1)). As in FLAME, the jaw is a pose of its own: the mesh's
linear response to the tracked jaw angles (``jaw_basis``) is removed before the PCA, so no expression
channel also opens the mouth — the rig's jaw bone and its expression shape keys would otherwise open it
twice, and a jaw keyed alone would ask for a face the video never showed. Any other video's landmarks
(a driving performance) project into the same space.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pvp.tracking import topology as topo
from pvp_contract.geometry import umeyama

MAX_COMPONENTS = 50  # as DECA's expression code
MIN_VARIANCE = 1e-6  # (0.1% of the eyes' distance)²: a component with less is no expression (a short clip's)


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
    mean: np.ndarray  # [468, 3] the video's mean pose-free mesh with the jaw closed (expression origin)
    components: np.ndarray  # [K, 468, 3] orthonormal directions
    scales: np.ndarray  # [K] standard deviation along each component
    explained: np.ndarray  # [K] fraction of the pose-free variance each component holds
    jaw_reference: np.ndarray  # [2] closed-jaw (opening, lateral) angles of the hinge-to-chin vector, radians
    # [2, 468, 3] the mesh's offset per radian of jaw (opening, lateral); zero in files from before it, whose
    # expressions hold the jaw too
    jaw_basis: np.ndarray = field(default_factory=lambda: np.zeros((2, topo.NUM_MESH, 3)))
    jaw_explained: float = 0.0  # fraction of the pose-free variance the jaw holds

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
        """[N, 468, 3] pose-free meshes -> [N, K] unit-variance coefficients (of what the jaw leaves)."""
        d = (posefree - self.mean).reshape(len(posefree), -1) - self.jaw(posefree)[:, :2] @ self.jaw_rows()
        return d @ self.components.reshape(len(self.components), -1).T / self.scales

    def jaw_rows(self) -> np.ndarray:
        """[2, 468 * 3]: the jaw basis as rows, for jaw angles [N, 2] @ it."""
        return self.jaw_basis.reshape(2, -1)

    def jaw(self, posefree: np.ndarray) -> np.ndarray:
        """FLAME-like jaw pose [N, 3] (axis-angle, radians): opening about X (> 0 opens), lateral about Y."""
        angles = _jaw_angles(posefree)
        return np.stack([self.jaw_reference[0] - angles[:, 0], angles[:, 1] - self.jaw_reference[1],
                         np.zeros(len(posefree))], -1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"face_model.{k}": np.atleast_1d(np.asarray(getattr(self, k), dtype=np.float32))
                for k in ARRAYS + JAW_ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FaceModel":
        """The face model of a track or avatar file; one written before the jaw basis gets none (its
        expressions were learned with the jaw in them, and keep it)."""
        fields = {k: np.asarray(arrays[f"face_model.{k}"], dtype=np.float64) for k in ARRAYS}
        if "face_model.jaw_basis" in arrays:
            fields["jaw_basis"] = np.asarray(arrays["face_model.jaw_basis"], dtype=np.float64)
            fields["jaw_explained"] = float(np.ravel(arrays.get("face_model.jaw_explained", 0.0))[0])
        return cls(**fields)


ARRAYS = ("canonical", "mean", "components", "scales", "explained", "jaw_reference")
JAW_ARRAYS = ("jaw_basis", "jaw_explained")


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
    gap = np.linalg.norm(free[:, topo.UPPER_LIP_INNER] - free[:, topo.LOWER_LIP_INNER], axis=-1)
    closed = gap <= np.quantile(gap, 0.1)
    model.jaw_reference = np.median(_jaw_angles(free)[closed], axis=0)
    jaw = model.jaw(free)[:, :2]
    d = (free - free.mean(0)).reshape(len(free), -1)
    jaw_rows = _least_squares(jaw - jaw.mean(0), d)
    residual = d - (jaw - jaw.mean(0)) @ jaw_rows
    _, sv, vt = np.linalg.svd(residual, full_matrices=False)
    # components with variance; a short clip has fewer than max_components, and the jaw's are gone
    k = min(max_components, max(1, int((sv > 1e-6 * np.linalg.norm(d)).sum())))
    var = sv**2 / len(free)
    total = max(float(np.square(d).sum()) / len(free), 1e-30)
    return FaceModel(canonical, free.mean(0) - (jaw.mean(0) @ jaw_rows).reshape(topo.NUM_MESH, 3),
                     vt[:k].reshape(k, topo.NUM_MESH, 3), np.sqrt(np.maximum(var[:k], MIN_VARIANCE)), var[:k] / total,
                     model.jaw_reference, jaw_rows.reshape(2, topo.NUM_MESH, 3),
                     1.0 - float(np.square(residual).sum()) / len(free) / total)


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """B minimising |x B - y|² for centred jaw angles x [N, 2] (radians), over the directions in which the jaw
    moved by more than 0.06° (sd): what is left of y is then exactly uncorrelated with the jaw, however few the
    frames, and a jaw that never moves gives B = 0."""
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    moved = sv**2 / len(x) > 1e-6
    return vt[moved].T @ (u[:, moved].T @ y / sv[moved, None])
