"""The avatar's control vector: named channels with units and ranges, shared by the server, the client and
the Blender extension through the avatar's schema (``info.avatar.control_schema``, ``avatar.json``).

Layout: head_yaw, head_pitch, head_roll (degrees; signs as pvp track: yaw > 0 nose to image right,
pitch > 0 nose up, roll > 0 clockwise), jaw_open, jaw_lateral (degrees, FLAME jaw rotation about X / Y),
then exp_00 .. exp_{K-1} (the subject's expression space, unit variance over its video). Code indexes a
control matrix [N, C] with the names below, never with bare column numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEAD = ("head_yaw", "head_pitch", "head_roll")
JAW = ("jaw_open", "jaw_lateral")
GROUPS = ("head", "jaw", "expression")
EXPRESSION_RANGE = 3.0

# columns of a control matrix [N, C] in schema order
YAW, PITCH, ROLL, JAW_OPEN, JAW_LATERAL = range(5)
HEAD_COLUMNS = slice(YAW, ROLL + 1)
JAW_COLUMNS = slice(JAW_OPEN, JAW_LATERAL + 1)
EXPRESSION_COLUMNS = slice(JAW_LATERAL + 1, None)
FACE_COLUMNS = slice(JAW_OPEN, None)  # jaw then expression: what reenactment renormalises


def expression_names(k: int) -> list[str]:
    return [f"exp_{i:02d}" for i in range(k)]


def expression_index(name: str) -> int | None:
    """The coefficient number of an ``exp_NN`` name, else None."""
    if name.startswith("exp_") and name[4:].isdigit():
        return int(name[4:])
    return None


def schema(expression_dim: int, yaw_range, pitch_range, jaw_open_range, roll_range=(-30.0, 30.0),
           jaw_lateral_range=(-10.0, 10.0), expression_ranges=None) -> dict:
    """The control schema stored in avatar.json and sent to clients. ``expression_ranges`` ([K] pairs):
    per-coefficient ranges (default +-3 sd)."""
    def channel(name, unit, lo, hi, group):
        return {"name": name, "unit": unit, "min": float(lo), "max": float(hi), "default": 0.0, "group": group}

    channels = [channel("head_yaw", "deg", *yaw_range, "head"), channel("head_pitch", "deg", *pitch_range, "head"),
                channel("head_roll", "deg", *roll_range, "head"), channel("jaw_open", "deg", *jaw_open_range, "jaw"),
                channel("jaw_lateral", "deg", *jaw_lateral_range, "jaw")]
    ranges = expression_ranges or [(-EXPRESSION_RANGE, EXPRESSION_RANGE)] * expression_dim
    channels += [channel(n, "sd", lo, hi, "expression")
                 for n, (lo, hi) in zip(expression_names(expression_dim), ranges)]
    for c in channels:  # a default must be a valid value even when the range excludes 0
        c["default"] = min(max(0.0, c["min"]), c["max"])
    return {"version": 1, "channels": channels}


def channel_names(schema_: dict) -> list[str]:
    return [c["name"] for c in schema_["channels"]]


def expression_dim(schema_: dict) -> int:
    """K: the number of expression coefficients (the jaw is not counted)."""
    return sum(1 for c in schema_["channels"] if c["group"] == "expression")


def defaults(schema_: dict) -> list[float]:
    return [c["default"] for c in schema_["channels"]]


def ranges(schema_: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) as float32 arrays [C]: the region the avatar learned."""
    channels = schema_["channels"]
    return (np.array([c["min"] for c in channels], np.float32), np.array([c["max"] for c in channels], np.float32))


def jaw_degrees(jaw_pose) -> np.ndarray:
    """[N, 3] FLAME jaw axis-angle (radians) -> [N, 2] opening (about X) and lateral (about Y), degrees."""
    return np.degrees(np.asarray(jaw_pose, np.float64)[:, :2])


def channel_columns(schema_: dict, head=None, jaw=None, expression=None) -> dict[str, np.ndarray]:
    """The schema's channels that the given groups provide, as columns [N] by name: head [N, 3] yaw,
    pitch, roll (degrees), jaw [N, 2] opening, lateral (degrees), expression [N, K'] (coefficient i drives
    exp_i; the schema's first min(K, K') coefficients)."""
    names = set(channel_names(schema_))
    out: dict[str, np.ndarray] = {}
    for group, values in ((HEAD, head), (JAW, jaw)):
        if values is not None:
            out.update({n: np.asarray(values)[:, i] for i, n in enumerate(group) if n in names})
    if expression is not None:
        exp_names = expression_names(expression_dim(schema_))[:np.shape(expression)[1]]
        out.update({n: np.asarray(expression)[:, i] for i, n in enumerate(exp_names)})
    return out


def control_matrix(schema_: dict, head, jaw, expression) -> np.ndarray:
    """[N, C] float32 in schema order from complete head, jaw and expression arrays (see channel_columns)."""
    k = expression_dim(schema_)
    if np.shape(expression)[1] < k:
        raise ValueError(f"the performance has {np.shape(expression)[1]} expression coefficients, the avatar needs {k}")
    columns = channel_columns(schema_, head, jaw, expression)
    return np.stack([columns[n] for n in channel_names(schema_)], 1).astype(np.float32)


# Spread below which a driving channel is tracker noise, not motion (jaw: degrees; expression: sd units).
JAW_NOISE_DEG = 0.5
EXPRESSION_NOISE_SD = 0.05


def noise_floor(name: str) -> float:
    return JAW_NOISE_DEG if name in JAW else EXPRESSION_NOISE_SD


def renormalize(values: np.ndarray, target_mean: Sequence[float], target_std: Sequence[float],
                noise_floor: Sequence[float] | None = None) -> np.ndarray:
    """The paper's reenactment normalisation (appendix B): columns [N, D] mapped from their own mean and
    standard deviation to the target's (the avatar's ``expression_stats`` for the same channels). A column
    whose own spread is below its ``noise_floor`` is only re-centred: scaling noise up to the avatar's
    range would animate a channel the performance holds still."""
    values = np.asarray(values, np.float64)
    own_std = values.std(0)
    floor = np.zeros(values.shape[1]) if noise_floor is None else np.asarray(noise_floor, np.float64)
    gain = np.where(own_std >= np.maximum(floor, 1e-9), np.asarray(target_std) / np.maximum(own_std, 1e-9), 1.0)
    return (values - values.mean(0)) * gain + np.asarray(target_mean)


def apply_expression_map(expression_map: dict, expression: np.ndarray) -> np.ndarray:
    """Expression coefficients of another basis (e.g. FLAME) [N, F] -> the avatar's [N, K], through a
    linear map fitted on the avatar's own video tracked in both (``weights`` [K, F'], ``bias`` [K]; the
    first F' source coefficients are used)."""
    weights, bias = np.asarray(expression_map["weights"], np.float64), np.asarray(expression_map["bias"], np.float64)
    used = weights.shape[1]
    if expression.shape[1] < used:
        raise ValueError(f"the expression map reads {used} coefficients, the performance has {expression.shape[1]}")
    return np.asarray(expression, np.float64)[:, :used] @ weights.T + bias


def fit_expression_map(source: np.ndarray, target: np.ndarray, ridge: float = 1e-2) -> dict:
    """Least-squares (ridge) linear map from source coefficients [N, F] to the avatar's [N, K] over the same
    frames: the map apply_expression_map uses."""
    x = np.asarray(source, np.float64)
    mean_x, mean_y = x.mean(0), np.asarray(target, np.float64).mean(0)
    xc, yc = x - mean_x, np.asarray(target, np.float64) - mean_y
    weights = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ yc).T
    return {"weights": weights.tolist(), "bias": (mean_y - weights @ mean_x).tolist()}


def face_stats_index(schema_: dict) -> dict[str, int]:
    """Channel name -> position in ``expression_stats`` (jaw_open, jaw_lateral, then exp_00 ...)."""
    return {n: i for i, n in enumerate([*JAW, *expression_names(expression_dim(schema_))])}
