"""Rig descriptions (rigs/*.json) and the map between rig values and the server's control vector.

Pure Python, no bpy: the Blender side reads bone rotations and shape-key values and hands them here.
A control is a sum of terms ``scale * degrees(bone rotation about axis)``; an expression channel is the
value of the shape key of the same name; an edit is a custom property ``<prefix><name>`` on the armature.
Imported values are written to each channel's first term.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

AXES = "XYZ"
ROTATION_MODES = ("XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX")


class RigError(ValueError):
    """A rig file that does not describe a usable rig; the message names the file and the field."""


@dataclass(frozen=True)
class Term:
    bone: str
    axis: int  # 0, 1, 2 for X, Y, Z
    scale: float  # control degrees per degree of bone rotation


@dataclass
class RigSpec:
    path: str
    name: str
    armature: str
    mesh: str
    bones: list[dict]
    channels: dict[str, list[Term]]
    requires: list[str]
    expression_group: str
    shape_key_prefix: str
    edit_prefix: str

    def matches(self, schema: dict) -> bool:
        names = {c["name"] for c in schema["channels"]}
        return set(self.requires) <= names

    def shape_key(self, channel: str) -> str:
        return self.shape_key_prefix + channel

    def edit_property(self, edit: str) -> str:
        return self.edit_prefix + edit

    def expression_channels(self, schema: dict) -> list[dict]:
        return [c for c in schema["channels"] if c["group"] == self.expression_group]

    def controls(self, schema: dict, bone_rotation, shape_key_value) -> list[float]:
        """The control vector in schema order. ``bone_rotation(bone)`` -> Euler (x, y, z) in radians;
        ``shape_key_value(name)`` -> float, or None when the key is missing (the channel's default)."""
        out = []
        for c in schema["channels"]:
            terms = self.channels.get(c["name"])
            if terms is not None:
                out.append(sum(t.scale * math.degrees(bone_rotation(t.bone)[t.axis]) for t in terms))
            elif c["group"] == self.expression_group:
                value = shape_key_value(self.shape_key(c["name"]))
                out.append(c["default"] if value is None else float(value))
            else:
                out.append(c["default"])
        return out

    def bone_limits(self, schema: dict) -> dict[str, dict[str, tuple[float, float]]]:
        """Rotation limits (degrees) per bone and axis: the rig file's, narrowed on every axis that drives a
        control channel to the range the avatar learned (the schema's min..max through the term's scale), so
        the rig's range is the avatar's visible range."""
        limits = {b["name"]: {a: tuple(v) for a, v in b["limits_deg"].items()} for b in self.bones}
        for c in schema["channels"]:
            for term in self.channels.get(c["name"], []):
                lo, hi = sorted((c["min"] / term.scale, c["max"] / term.scale))
                limits.setdefault(term.bone, {})[AXES[term.axis].lower()] = (lo, hi)
        return limits

    def bone_target(self, channel: str, value: float) -> tuple[str, int, float]:
        """Where an imported control value goes: (bone, axis, radians) on the channel's first term."""
        term = self.channels[channel][0]
        return term.bone, term.axis, math.radians(value / term.scale)


def _field(data: dict, key: str, kind, path, where: str = ""):
    value = data.get(key)
    if not isinstance(value, kind):
        raise RigError(f"{path}: {where}{key!r} must be {getattr(kind, '__name__', kind)}, found {value!r}")
    return value


def _vector(value, path, where) -> list[float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise RigError(f"{path}: {where} must be three numbers, found {value!r}")
    return [float(v) for v in value]


def parse_rig(data: dict, path: str = "<rig>") -> RigSpec:
    if data.get("format") != "pvp.rig":
        raise RigError(f"{path}: not a pvp rig (format must be 'pvp.rig')")
    if data.get("version") != 1:
        raise RigError(f"{path}: rig version {data.get('version')!r} is not supported (this reads version 1)")
    bones, names = [], set()
    for i, b in enumerate(_field(data, "bones", list, path)):
        where = f"bones[{i}]."
        name = _field(b, "name", str, path, where)
        parent = b.get("parent")
        if parent is not None and parent not in names:
            raise RigError(f"{path}: {where}parent {parent!r} is not a bone listed before it")
        mode = b.get("rotation_mode", "XYZ")
        if mode not in ROTATION_MODES:
            raise RigError(f"{path}: {where}rotation_mode {mode!r} is not one of {', '.join(ROTATION_MODES)}")
        limits = b.get("limits_deg", {})
        for axis, lohi in limits.items():
            if axis not in "xyz" or not (isinstance(lohi, list) and len(lohi) == 2 and lohi[0] <= lohi[1]):
                raise RigError(f"{path}: {where}limits_deg.{axis} must be [min, max] for an axis x, y or z")
        bones.append({"name": name, "parent": parent, "head": _vector(b.get("head"), path, where + "head"),
                      "tail": _vector(b.get("tail"), path, where + "tail"), "rotation_mode": mode,
                      "limits_deg": limits, "optional": bool(b.get("optional", False))})
        names.add(name)
    channels = {}
    for channel, terms in _field(data, "channels", dict, path).items():
        if not isinstance(terms, list) or not terms:
            raise RigError(f"{path}: channels.{channel} must be a non-empty list of terms")
        parsed = []
        for j, t in enumerate(terms):
            where = f"channels.{channel}[{j}]."
            bone = _field(t, "bone", str, path, where)
            if bone not in names:
                raise RigError(f"{path}: {where}bone {bone!r} is not a bone of the rig")
            axis = _field(t, "axis", str, path, where)
            if axis not in AXES:
                raise RigError(f"{path}: {where}axis must be X, Y or Z")
            scale = _field(t, "scale", (int, float), path, where)
            if scale == 0:
                raise RigError(f"{path}: {where}scale must not be 0")
            parsed.append(Term(bone, AXES.index(axis), float(scale)))
        channels[channel] = parsed
    requires = _field(data, "requires", list, path)
    missing = [r for r in requires if r not in channels]
    if missing:
        raise RigError(f"{path}: required channels {missing} have no bone terms in 'channels'")
    expression = data.get("expression", {})
    return RigSpec(path, _field(data, "name", str, path), data.get("armature", "PVP_Rig"), data.get("mesh", "PVP_Face"),
                   bones, channels, requires,
                   expression.get("group", "expression"), expression.get("shape_key_prefix", ""),
                   data.get("edits", {}).get("property_prefix", "pvp_edit_"))


def load_rig(path) -> RigSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RigError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise RigError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise RigError(f"{path}: a rig file holds a JSON object")
    return parse_rig(data, str(path))


def rig_for_schema(folder, schema: dict) -> RigSpec:
    """The first rig (by file name) in ``folder`` whose required channels the schema has."""
    specs = [load_rig(p) for p in sorted(Path(folder).glob("*.json"))]
    for spec in specs:
        if spec.matches(schema):
            return spec
    names = [c["name"] for c in schema["channels"]][:8]
    raise RigError(f"no rig in {folder} matches the avatar's controls (starting {names}); "
                   f"rigs there: {[Path(s.path).name for s in specs]}")
