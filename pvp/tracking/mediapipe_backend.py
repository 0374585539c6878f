"""The embedded landmark backend: MediaPipe's face mesh (478 points with the iris refinement), following
one face from frame to frame."""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


class MediaPipeLandmarker:
    name = "mediapipe"

    def __init__(self, static_images: bool = False, max_faces: int = 2):
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logs otherwise flood stderr
        try:
            import mediapipe as mp
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise RuntimeError("the embedded tracker needs mediapipe 0.10.x: pip install 'mediapipe==0.10.14'") from e
        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=static_images, max_num_faces=max_faces,
                                                     refine_landmarks=True, min_detection_confidence=0.5,
                                                     min_tracking_confidence=0.5)
        self._previous: np.ndarray | None = None

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        """RGB uint8 frame -> (normalised landmarks [478, 3] of the followed face or None, faces seen)."""
        result = self._mesh.process(rgb)
        faces = result.multi_face_landmarks or []
        if not faces:
            return None, 0
        meshes = [np.array([(p.x, p.y, p.z) for p in f.landmark], dtype=np.float32) for f in faces]
        if self._previous is None or len(meshes) == 1:
            # First sight: the largest face (widest landmark spread) is the subject.
            pick = max(meshes, key=lambda m: np.ptp(m[:, 0])) if self._previous is None else meshes[0]
        else:
            pick = min(meshes, key=lambda m: float(np.abs(m[:, :2] - self._previous[:, :2]).mean()))
        self._previous = pick
        return pick, len(meshes)

    def close(self):
        self._mesh.close()
