"""Pivot frames: K-means over (yaw, pitch, expression) of the training frames (paper 4.1).

'kmeans'          the authors' code (make_keyframes_expr.py): features whitened (each divided by its
                  standard deviation), K clusters, one random member of each cluster.
'kmeans-nearest'  standardised features, the frame nearest each centre, and the frames at the extremes of
                  yaw and pitch always kept so that the pivots' hull spans the video's head poses.
'uniform'         K frames evenly spaced in time.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

PIVOT_METHODS = ("kmeans", "kmeans-nearest", "uniform")


def pivot_features(yaw_pitch: np.ndarray, expression: np.ndarray, centre: bool = True) -> np.ndarray:
    """Features divided by their standard deviation (a constant one is left as it is); centred if asked."""
    feats = np.concatenate([yaw_pitch, expression], axis=1).astype(np.float64)
    std = feats.std(0)
    return (feats - (feats.mean(0) if centre else 0.0)) / np.where(std > 1e-8, std, 1.0)


def select_pivots(yaw_pitch: np.ndarray, expression: np.ndarray, k: int, method: str = "kmeans",
                  seed: int = 0) -> np.ndarray:
    """Indices (into the given rows) of at most k pivots, sorted."""
    n = len(yaw_pitch)
    k = min(k, n)
    if method == "uniform":
        return np.unique(np.linspace(0, n - 1, k).round().astype(int))
    if method == "kmeans":
        feats = pivot_features(yaw_pitch, expression, centre=False)
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(feats).labels_
        rng = np.random.default_rng(seed)
        return np.array(sorted(int(rng.choice(np.flatnonzero(labels == c))) for c in np.unique(labels)))
    if method != "kmeans-nearest":
        raise ValueError(f"pivot selection {method!r}: expected one of {', '.join(PIVOT_METHODS)}")
    extremes = {int(np.argmin(yaw_pitch[:, 0])), int(np.argmax(yaw_pitch[:, 0])),
                int(np.argmin(yaw_pitch[:, 1])), int(np.argmax(yaw_pitch[:, 1]))}
    feats = pivot_features(yaw_pitch, expression)
    n_clusters = max(1, k - len(extremes))
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(feats)
    chosen = set(extremes)
    for c in km.cluster_centers_:
        order = np.argsort(((feats - c) ** 2).sum(1))
        chosen.add(int(next((i for i in order if int(i) not in chosen), order[0])))
    return np.array(sorted(chosen))[:k]
