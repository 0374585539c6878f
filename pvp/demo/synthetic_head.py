"""A synthetic portrait clip rendered with Blender (bpy): a procedural head whose rotation, jaw and two
expressions (smile, brow raise) are known for every frame, so the demo needs no input from outside and
doubles as a ground-truth benchmark.

Run in its own process (Blender's state stays out of pvp's):
    python -m pvp.demo.synthetic_head OUT_DIR [--frames 240] [--size 256] [--fps 25]
writes OUT_DIR/frames/frame_NNNNNN.png and OUT_DIR/truth.json (per frame: yaw, pitch, roll, jaw in degrees
with pvp's signs, smile and brow in [0, 1]).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path


def performance(n: int, fps: float) -> list[dict]:
    """A smooth performance covering the pose space: sums of sines with unrelated periods."""
    out = []
    for i in range(n):
        t = i / fps
        out.append({"frame": i,
                    "yaw": 24 * math.sin(2 * math.pi * t / 7.0) + 4 * math.sin(2 * math.pi * t / 2.3),
                    "pitch": 9 * math.sin(2 * math.pi * t / 5.1 + 1.0),
                    "roll": 4 * math.sin(2 * math.pi * t / 6.3 + 0.5),
                    "jaw": max(0.0, 16 * math.sin(2 * math.pi * t / 3.1)),
                    "smile": 0.5 + 0.5 * math.sin(2 * math.pi * t / 4.3 + 2.0),
                    "brow": max(0.0, math.sin(2 * math.pi * t / 3.7 - 1.0))})
    return out


# Meshes are built from their vertices and faces rather than with bpy.ops.mesh.primitive_*: those order their faces
# differently in each process; the smooth normals then differ in their last bits, and so does the rendered clip.
def uv_sphere(segments: int = 32, rings: int = 16) -> tuple[list, list]:
    """A unit UV sphere's vertices and faces (outward), poles on z."""
    vertices = [(0.0, 0.0, 1.0)]
    for r in range(1, rings):
        theta = math.pi * r / rings
        vertices += [(math.sin(theta) * math.cos(2 * math.pi * k / segments),
                      math.sin(theta) * math.sin(2 * math.pi * k / segments), math.cos(theta))
                     for k in range(segments)]
    vertices.append((0.0, 0.0, -1.0))
    south = len(vertices) - 1

    def ring(r, k):
        return 1 + (r - 1) * segments + k % segments

    faces = [(0, ring(1, k), ring(1, k + 1)) for k in range(segments)]
    faces += [(ring(r, k), ring(r + 1, k), ring(r + 1, k + 1), ring(r, k + 1))
              for r in range(1, rings - 1) for k in range(segments)]
    faces += [(ring(rings - 1, k + 1), ring(rings - 1, k), south) for k in range(segments)]
    return vertices, faces


def cylinder(segments: int = 32) -> tuple[list, list]:
    """A cylinder of radius 1 from z = -1 to 1, capped, its faces outward."""
    vertices = [(math.cos(2 * math.pi * k / segments), math.sin(2 * math.pi * k / segments), z)
                for z in (1.0, -1.0) for k in range(segments)]
    faces = [(k, k + segments, (k + 1) % segments + segments, (k + 1) % segments) for k in range(segments)]
    faces += [tuple(range(segments)), tuple(range(2 * segments - 1, segments - 1, -1))]
    return vertices, faces


def build_scene(bpy, size: int):
    from mathutils import Vector

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene

    def material(name, rgb, roughness=0.6):
        m = bpy.data.materials.new(name)
        m.use_nodes = True
        bsdf = m.node_tree.nodes["Principled BSDF"]
        bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
        bsdf.inputs["Roughness"].default_value = roughness
        return m

    def mesh_object(name, mesh_data, location, scale, mat, smooth):
        vertices, faces = mesh_data
        mesh = bpy.data.meshes.new(name)
        mesh.from_pydata(vertices, [], faces)
        if smooth:
            mesh.shade_smooth()
        mesh.materials.append(mat)
        ob = bpy.data.objects.new(name, mesh)
        scene.collection.objects.link(ob)
        ob.location, ob.scale = location, scale
        return ob

    def blob(name, location, scale, mat, parent):
        ob = mesh_object(name, uv_sphere(), location, scale, mat, smooth=True)
        ob.parent = parent
        return ob

    skin, hair = material("skin", (0.80, 0.55, 0.42)), material("hair", (0.12, 0.07, 0.04), 0.8)
    white, iris = material("sclera", (0.9, 0.9, 0.88), 0.3), material("iris", (0.08, 0.05, 0.03), 0.2)
    lip, mouth = material("lip", (0.55, 0.18, 0.16)), material("mouth", (0.05, 0.02, 0.02))
    shirt = material("shirt", (0.15, 0.25, 0.45))

    bpy.ops.object.empty_add(location=(0, 0, 0))
    head = bpy.context.object
    head.name, head.rotation_mode = "head", "YXZ"  # R = Rz(yaw) Rx(-pitch) Ry(roll): pvp's order, Blender axes
    blob("skull", (0, 0, 0), (0.078, 0.095, 0.11), skin, head)
    blob("hair", (0, 0.012, 0.03), (0.082, 0.095, 0.1), hair, head)
    blob("cheeks", (0, -0.02, -0.06), (0.062, 0.07, 0.06), skin, head)
    parts = {}
    for s in (-1, 1):
        blob(f"eye{s}", (s * 0.032, -0.072, 0.018), (0.014, 0.01, 0.0085), white, head)
        blob(f"iris{s}", (s * 0.032, -0.081, 0.018), (0.0065, 0.003, 0.0065), iris, head)
        brow = blob(f"brow{s}", (s * 0.033, -0.079, 0.04), (0.02, 0.006, 0.004), hair, head)
        brow.rotation_euler = (0, s * 0.15, 0)
        parts[f"brow{s}"] = brow
        blob(f"ear{s}", (s * 0.08, 0.0, 0.0), (0.012, 0.02, 0.03), skin, head)
    blob("nose", (0, -0.09, -0.008), (0.013, 0.02, 0.024), skin, head)
    bpy.ops.object.empty_add(location=(0, -0.03, -0.02))
    jaw = bpy.context.object
    jaw.name, jaw.parent = "jaw", head
    parts["upper_lip"] = blob("upper_lip", (0, -0.082, -0.042), (0.024, 0.008, 0.0055), lip, head)
    blob("mouth", (0, -0.078, -0.048), (0.021, 0.005, 0.006), mouth, head)
    parts["lower_lip"] = blob("lower_lip", (0, 0, 0), (0.022, 0.008, 0.0055), lip, jaw)
    parts["lower_lip"].location = Vector((0, -0.082, -0.052)) - jaw.location
    for ob in parts.values():
        ob["rest"], ob["rest_scale"] = list(ob.location), list(ob.scale)
    chin = blob("chin", (0, 0, 0), (0.04, 0.04, 0.03), skin, jaw)
    chin.location = Vector((0, -0.05, -0.085)) - jaw.location
    mesh_object("neck", cylinder(), (0, 0.01, -0.14), (0.045, 0.045, 0.06), skin, smooth=False)
    mesh_object("shoulders", uv_sphere(), (0, 0.03, -0.27), (0.2, 0.1, 0.08), shirt, smooth=False)

    bpy.ops.object.light_add(type="SUN", location=(0.3, -1, 1))
    sun = bpy.context.object
    sun.data.energy, sun.rotation_euler = 3.0, (math.radians(50), 0, math.radians(-20))
    bpy.ops.object.camera_add(location=(0, -0.55, -0.01), rotation=(math.pi / 2, 0, 0))
    scene.camera = bpy.context.object
    scene.camera.data.lens = 50
    scene.world = bpy.data.worlds.new("studio")
    scene.world.use_nodes = True
    background = scene.world.node_tree.nodes["Background"]
    background.inputs[0].default_value, background.inputs[1].default_value = (0.35, 0.38, 0.42, 1), 0.8
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.use_denoising, scene.cycles.device = 8, False, "CPU"
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    return scene, head, jaw, parts


def pose(head, jaw, parts, f: dict) -> None:
    head.rotation_euler = (math.radians(-f["pitch"]), math.radians(f["roll"]), math.radians(f["yaw"]))
    jaw.rotation_euler = (math.radians(f["jaw"]), 0.0, 0.0)
    for s in (-1, 1):
        brow = parts[f"brow{s}"]
        brow.location.z = brow["rest"][2] + 0.008 * f["brow"]
    for name in ("upper_lip", "lower_lip"):
        lip = parts[name]
        lip.scale.x = lip["rest_scale"][0] * (1 + 0.35 * f["smile"])
        lip.location.z = lip["rest"][2] + 0.003 * f["smile"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--fps", type=float, default=25.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="pvp_synth_blender_"))
    import bpy

    scene, head, jaw, parts = build_scene(bpy, args.size)
    frames_dir = args.out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    truth = performance(args.frames, args.fps)
    for f in truth:
        target = frames_dir / f"frame_{f['frame']:06d}.png"
        if target.exists():  # resumable
            continue
        pose(head, jaw, parts, f)
        scene.render.filepath = str(frames_dir / f".tmp_{f['frame']:06d}.png")
        bpy.ops.render.render(write_still=True)
        Path(scene.render.filepath).replace(target)
    (args.out / "truth.json").write_text(json.dumps({"fps": args.fps, "size": args.size, "frames": truth}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
