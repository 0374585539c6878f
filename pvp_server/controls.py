"""The avatar's control vector: named channels with units and ranges (pure Python: the server, the
client and the Blender add-on share it through the avatar's schema).

Layout: head_yaw, head_pitch, head_roll (degrees; signs as pvp track: yaw > 0 nose to image right,
pitch > 0 nose up, roll > 0 clockwise), jaw_open, jaw_lateral (degrees, FLAME jaw rotation about X / Y),
then exp_00 .. exp_{K-1} (the subject's expression space, unit variance over its video).
"""
from __future__ import annotations

HEAD = ("head_yaw", "head_pitch", "head_roll")
JAW = ("jaw_open", "jaw_lateral")
EXPRESSION_RANGE = 3.0


def expression_names(k: int) -> list[str]:
    return [f"exp_{i:02d}" for i in range(k)]


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
    channels += [channel(n, "sd", lo, hi, "expression") for n, (lo, hi) in zip(expression_names(expression_dim), ranges)]
    for c in channels:  # a default must be a valid value even when the range excludes 0
        c["default"] = min(max(0.0, c["min"]), c["max"])
    return {"version": 1, "channels": channels}


def channel_names(schema_: dict) -> list[str]:
    return [c["name"] for c in schema_["channels"]]


def expression_dim(schema_: dict) -> int:
    return sum(1 for c in schema_["channels"] if c["group"] == "expression")


def defaults(schema_: dict) -> list[float]:
    return [c["default"] for c in schema_["channels"]]
