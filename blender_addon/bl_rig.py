"""Blender side of the rig: build the armature and control mesh from a RigSpec, read its values (now or
at any frame, from F-curves) and write imported values as keyframes."""
from __future__ import annotations

import math

import bpy
import numpy as np

from .rig import RigSpec

INTEROCULAR_M = 0.063  # the face model's unit (interocular distance 1) in metres
EYE_LEVEL_M = 0.25


# --- building --------------------------------------------------------------------------------------------

def _link(context, ob) -> None:
    context.scene.collection.objects.link(ob)


def build_armature(context, spec: RigSpec, schema: dict) -> bpy.types.Object:
    """The armature, its bones' rotation limits those the avatar learned (RigSpec.bone_limits)."""
    arm = bpy.data.armatures.new(spec.armature)
    ob = bpy.data.objects.new(spec.armature, arm)
    _link(context, ob)
    previous = context.view_layer.objects.active
    context.view_layer.objects.active = ob
    bpy.ops.object.mode_set(mode="EDIT")
    for b in spec.bones:
        eb = arm.edit_bones.new(b["name"])
        eb.head, eb.tail, eb.roll = b["head"], b["tail"], 0.0
        if b["parent"]:
            eb.parent = arm.edit_bones[b["parent"]]
    bpy.ops.object.mode_set(mode="OBJECT")
    context.view_layer.objects.active = previous or ob
    limits = spec.bone_limits(schema)
    for b in spec.bones:
        pb = ob.pose.bones[b["name"]]
        pb.rotation_mode = b["rotation_mode"]
        if limits.get(b["name"]):
            con = pb.constraints.new("LIMIT_ROTATION")
            con.owner_space = "LOCAL"
            for axis, (lo, hi) in limits[b["name"]].items():
                setattr(con, f"use_limit_{axis}", True)
                setattr(con, f"min_{axis}", math.radians(lo))
                setattr(con, f"max_{axis}", math.radians(hi))
    ob["pvp_rig"] = spec.name
    return ob


def face_mesh_arrays(reply: dict) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The server's face_mesh reply -> Blender-frame vertices (metres), triangles, shape-key offsets."""
    n = int(reply["vertex_count"])

    def to_blender(flat: bytes) -> np.ndarray:  # FLAME (X, Y up, Z to camera) -> Blender (X, -Z, Y)
        v = np.frombuffer(flat, "<f4").reshape(n, 3).astype(np.float64) * INTEROCULAR_M
        return np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)

    verts = to_blender(reply["vertices"])
    verts += np.array([0.0, -0.07, EYE_LEVEL_M]) - [verts[:, 0].mean(), verts[:, 1].min() + 0.02, verts[:, 2].mean()]
    tris = np.frombuffer(reply["triangles"], "<i4").reshape(-1, 3)
    return verts, tris, {name: to_blender(off) for name, off in reply["shape_keys"].items()}


def proxy_mesh_arrays(names: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A head-sized ellipsoid whose shape keys are smooth bumps spread over the face, one per channel."""
    rings, segments = 16, 24
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    verts = np.stack([0.075 * np.sin(t).ravel() * np.cos(p).ravel(), 0.09 * np.sin(t).ravel() * np.sin(p).ravel(),
                      0.11 * np.cos(t).ravel()], 1)
    verts = np.vstack([[0, 0, 0.11], verts, [0, 0, -0.11]]) + [0, 0, EYE_LEVEL_M - 0.02]
    faces = []
    for r in range(rings - 1):
        for s in range(segments):
            a, b = 1 + r * segments + s, 1 + r * segments + (s + 1) % segments
            if r == 0:
                faces.append((0, b, a))
            if r < rings - 2:
                faces += [(a, b, b + segments), (a, b + segments, a + segments)]
    last = 1 + (rings - 2) * segments
    faces += [(last + s, last + (s + 1) % segments, len(verts) - 1) for s in range(segments)]
    centre = verts.mean(0)
    normals = (verts - centre) / np.linalg.norm(verts - centre, axis=1, keepdims=True)
    keys = {}
    for i, name in enumerate(names):
        angle = -np.pi / 2 + (i / max(1, len(names) - 1) - 0.5) * 1.6  # spread over the front (-Y)
        height = EYE_LEVEL_M - 0.02 + 0.06 * np.sin(2.4 * i)
        spot = np.array([0.08 * np.cos(angle), 0.09 * np.sin(angle), height])
        weight = np.exp(-((verts - spot) ** 2).sum(1) / 0.03 ** 2)
        keys[name] = normals * (0.012 * weight)[:, None]
    return verts, np.array(faces), keys


def build_mesh(context, spec: RigSpec, rig: bpy.types.Object, schema: dict, mesh_arrays) -> bpy.types.Object:
    verts, tris, offsets = mesh_arrays
    me = bpy.data.meshes.new(spec.mesh)
    me.from_pydata(verts.tolist(), [], tris.tolist())
    me.update()
    ob = bpy.data.objects.new(spec.mesh, me)
    _link(context, ob)
    ob.parent = rig
    head, jaw = ob.vertex_groups.new(name="head"), ob.vertex_groups.new(name="jaw")
    jaw_bone = next((b for b in spec.bones if b["name"] == "jaw"), None)
    if jaw_bone is not None:  # below the jaw hinge and in front of it moves with the jaw
        hinge_z, tip = jaw_bone["head"][2], np.array(jaw_bone["tail"])
        w = np.clip((hinge_z - 0.01 - verts[:, 2]) / 0.03, 0, 1) * np.clip((-verts[:, 1] - 0.0) / 0.04, 0, 1)
        w *= (verts[:, 2] < tip[2] + 0.04)
        for i, wi in enumerate(w):
            if wi > 0:
                jaw.add([i], float(wi), "REPLACE")
            if wi < 1:
                head.add([i], float(1 - wi), "REPLACE")
    else:
        head.add(list(range(len(verts))), 1.0, "REPLACE")
    ob.modifiers.new("Armature", "ARMATURE").object = rig
    ob.shape_key_add(name="Basis", from_mix=False)
    for c in spec.expression_channels(schema):
        kb = ob.shape_key_add(name=spec.shape_key(c["name"]), from_mix=False)
        kb.slider_min, kb.slider_max = max(-10.0, c["min"]), min(10.0, c["max"])
        kb.value = c["default"]
        off = offsets.get(c["name"])
        if off is not None:
            kb.data.foreach_set("co", (verts + off).astype(np.float32).ravel())
    ob.hide_render = True  # a control for the animator: renders show the avatar on the plane only
    return ob


def add_edit_properties(rig: bpy.types.Object, spec: RigSpec, edits: list[dict]) -> None:
    for e in edits:
        prop = spec.edit_property(e["name"])
        rig[prop] = float(e.get("default", 0.0))
        lo, hi = float(e.get("min", -10.0)), float(e.get("max", 10.0))
        rig.id_properties_ui(prop).update(min=lo, max=hi, soft_min=lo, soft_max=hi,
                                          description=f"pvp appearance edit '{e['name']}' ({e.get('kind', '')})")


# --- reading ---------------------------------------------------------------------------------------------

def channels_of(action, slot=None, idblock=None):
    """What holds an action's F-curves and groups (``.fcurves``, ``.groups``) for one slot: the action itself in
    Blender 4.2 and 4.3; the slot's channelbag in 4.4+ (layered actions; ``Action.fcurves`` is gone in 5.0).
    With ``idblock``, a slot for it (when ``slot`` is None) and the channelbag are made when missing; without,
    None when the action holds nothing for the slot."""
    if not hasattr(action, "slots"):  # Blender 4.2, 4.3
        return action
    if slot is None and idblock is not None:
        slot = action.slots.new(idblock.id_type, idblock.name)
    if slot is None:
        return None
    for layer in action.layers:
        for strip in layer.strips:
            bag = strip.channelbag(slot)
            if bag is not None:
                return bag
    if idblock is None:
        return None
    layer = action.layers[0] if len(action.layers) else action.layers.new("Layer")
    strip = layer.strips[0] if len(layer.strips) else layer.strips.new(type="KEYFRAME")
    return strip.channelbag(slot, ensure=True)


def _action_curves(action, slot) -> list:
    channels = channels_of(action, slot)
    return list(channels.fcurves) if channels is not None else []


def fcurves_of(idblock) -> list:
    """The F-curves of a datablock's active action (for its slot in Blender 4.4+)."""
    ad = getattr(idblock, "animation_data", None)
    if ad is None or ad.action is None:
        return []
    return _action_curves(ad.action, getattr(ad, "action_slot", None))


class CurveStack:
    """A datablock's animation as F-curves at any frame: its NLA strips, bottom track first, then the active
    action on top (each later source replaces a channel it animates, as NLA 'Replace' strips at full
    influence do). Strip time maps 1:1 onto the action (scale and repeat 1, as imports are)."""

    def __init__(self, idblock):
        self.sources = []  # (curves by (path, index), strip or None)
        ad = getattr(idblock, "animation_data", None) if idblock is not None else None
        if ad is None:
            return
        for track in ad.nla_tracks:
            if track.mute:
                continue
            for strip in track.strips:
                if strip.action is not None and not strip.mute:
                    curves = _action_curves(strip.action, getattr(strip, "action_slot", None))
                    self.sources.append(({(c.data_path, c.array_index): c for c in curves}, strip))
        if ad.action is not None:
            self.sources.append(({(c.data_path, c.array_index): c for c in fcurves_of(idblock)}, None))

    def evaluate(self, path: str, index: int, frame: float) -> float | None:
        for curves, strip in reversed(self.sources):
            curve = curves.get((path, index))
            if curve is None:
                continue
            if strip is None:
                return curve.evaluate(frame)
            inside = strip.frame_start <= frame <= strip.frame_end
            if inside or strip.extrapolation == "HOLD" or (strip.extrapolation == "HOLD_FORWARD"
                                                           and frame > strip.frame_end):
                local = min(max(frame, strip.frame_start), strip.frame_end)
                return curve.evaluate(local - strip.frame_start + strip.action_frame_start)
        return None


class RigReader:
    """Reads a rig's values as the server's controls: now (what the depsgraph evaluated for this frame)
    or at another frame from its F-curves and NLA strips (for prefetching)."""

    def __init__(self, spec: RigSpec, rig, mesh, schema: dict, edits: list[dict]):
        self.spec, self.rig, self.mesh, self.schema, self.edits = spec, rig, mesh, schema, edits
        self.limits = spec.bone_limits(schema)

    def _clamped(self, bone: str, euler) -> tuple[float, float, float]:
        limits = self.limits.get(bone, {})
        out = []
        for i, axis in enumerate("xyz"):
            v = euler[i]
            if axis in limits:
                v = min(max(v, math.radians(limits[axis][0])), math.radians(limits[axis][1]))
            out.append(v)
        return tuple(out)

    def key_blocks(self):
        keys = self.mesh.data.shape_keys if self.mesh is not None else None
        return keys.key_blocks if keys is not None else {}

    def now(self) -> tuple[list[float], dict[str, float]]:
        bones, blocks = self.rig.pose.bones, self.key_blocks()

        def rotation(name):
            pb = bones.get(name)
            return self._clamped(name, pb.rotation_euler) if pb is not None else (0.0, 0.0, 0.0)

        def shape_key(name):
            kb = blocks.get(name)
            return kb.value if kb is not None else None

        edits = {e["name"]: float(self.rig.get(self.spec.edit_property(e["name"]), e.get("default", 0.0)))
                 for e in self.edits}
        return self.spec.controls(self.schema, rotation, shape_key), edits

    def at(self, frames, current: dict[str, float] | None = None) -> list[tuple[list[float], dict[str, float]]]:
        """Values at each of ``frames`` from the F-curves (the current value where a channel has none;
        ``current``: the edit strengths now, when the caller has read them already)."""
        edits_now = current if current is not None else self.now()[1]
        rig_curves = CurveStack(self.rig)
        key_curves = CurveStack(self.mesh.data.shape_keys if self.mesh is not None else None)
        bones, blocks = self.rig.pose.bones, self.key_blocks()
        out = []
        for f in frames:
            def rotation(name, f=f):
                pb = bones.get(name)
                if pb is None:
                    return (0.0, 0.0, 0.0)
                path = f'pose.bones["{name}"].rotation_euler'
                keyed = [rig_curves.evaluate(path, i, f) for i in range(3)]
                return self._clamped(name, [pb.rotation_euler[i] if v is None else v for i, v in enumerate(keyed)])

            def shape_key(name, f=f):
                kb = blocks.get(name)
                if kb is None:
                    return None
                v = key_curves.evaluate(f'key_blocks["{name}"].value', 0, f)
                return kb.value if v is None else min(max(v, kb.slider_min), kb.slider_max)

            edits = {}
            for e in self.edits:
                v = rig_curves.evaluate(f'["{self.spec.edit_property(e["name"])}"]', 0, f)
                edits[e["name"]] = edits_now[e["name"]] if v is None else v
            out.append((self.spec.controls(self.schema, rotation, shape_key), edits))
        return out


# --- writing keyframes -----------------------------------------------------------------------------------

TAKE_MODES = ("STRIP", "MERGE")


def _set_interpolation(points, hold_after, gaps: str) -> None:
    for point, hold in zip(points, hold_after):
        point.interpolation = "CONSTANT" if hold and gaps == "HOLD" else "LINEAR"


def _push_down(ad) -> None:
    """Blender's NLA Push Down: the active action becomes a strip on a track of its own (its keys untouched)."""
    action = ad.action
    track = ad.nla_tracks.new()
    track.name = action.name
    start = int(math.floor(action.frame_range[0]))
    track.strips.new(action.name, start, action)  # the first strip holds its ends, as the action did
    ad.action = None


def write_take(idblock, name: str, channels: list[tuple[str, int, str, np.ndarray, np.ndarray, np.ndarray]],
               gaps: str = "HOLD", mode: str = "STRIP") -> None:
    """Key an imported take on ``idblock`` (the rig, or the control mesh's shape keys); ``channels``:
    (data path, array index or -1, group, frames [N], values [N], hold after [N]).

    STRIP: the take becomes its own action on an NLA track named ``name`` at its frames (a take imported
    again under the same name replaces it); an active action that animates the same channels is pushed
    down into the NLA first, so it keeps every key and the take plays over it only inside its range.
    MERGE: the take is written into the active action, replacing that action's keys of these channels
    inside the take's frame range only."""
    ad = idblock.animation_data or idblock.animation_data_create()
    if mode == "STRIP":
        for track in [t for t in ad.nla_tracks if t.name == name]:
            old = [s.action for s in track.strips if s.action is not None]
            ad.nla_tracks.remove(track)
            for action in old:  # the replaced take's action, unless something else still uses it
                if action.users == 0:
                    bpy.data.actions.remove(action)
        paths = {(path, max(index, 0)) for path, index, *_ in channels}
        if ad.action is not None and any((fc.data_path, fc.array_index) in paths for fc in fcurves_of(idblock)):
            _push_down(ad)
        action = bpy.data.actions.new(name)
        take = channels_of(action, idblock=idblock)
        for path, index, group, frames, values, hold_after in channels:
            fc = take.fcurves.new(path, index=max(index, 0))
            if group:
                fc.group = take.groups.get(group) or take.groups.new(group)
            fc.keyframe_points.add(len(frames))
            fc.keyframe_points.foreach_set("co", np.stack([frames, values], 1).astype(np.float32).ravel())
            _set_interpolation(fc.keyframe_points, hold_after, gaps)
            fc.update()
        track = ad.nla_tracks.new()
        track.name = name
        strip = track.strips.new(name, int(min(c[3][0] for c in channels)), action)
        strip.extrapolation = "NOTHING"  # outside the take, what lies below plays
        return
    for path, index, group, frames, values, hold_after in channels:
        lo, hi = float(frames[0]), float(frames[-1])
        fc = next((c for c in fcurves_of(idblock) if c.data_path == path and c.array_index == max(index, 0)), None)
        if fc is None:
            idblock.keyframe_insert(path, index=index, frame=lo, group=group)
            fc = next(c for c in fcurves_of(idblock) if c.data_path == path and c.array_index == max(index, 0))
        for point in reversed(list(fc.keyframe_points)):  # the take's range only: other keys stay as they are
            if lo - 1e-3 <= point.co[0] <= hi + 1e-3:
                fc.keyframe_points.remove(point, fast=True)
        for f, v in zip(frames, values):
            fc.keyframe_points.insert(float(f), float(v), options={"FAST"})
        fc.update()
        # keys by frame only now: each insert may move the curve's key array, so earlier handles are stale
        by_frame = {round(point.co[0], 3): point for point in fc.keyframe_points}
        _set_interpolation([by_frame[round(float(f), 3)] for f in frames], hold_after, gaps)
