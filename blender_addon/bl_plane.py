"""The image plane: a quad with the avatar's aspect and an emission material showing a Blender image
that the add-on updates in place."""
from __future__ import annotations

import math

import bpy
from mathutils import Vector

from .preview import pixels_rgba

IMAGE_NAME = "PVP_Frame"
PLANE_NAME = "PVP_Plane"


def ensure_image(width: int, height: int) -> bpy.types.Image:
    image = bpy.data.images.get(IMAGE_NAME)
    if image is None:
        image = bpy.data.images.new(IMAGE_NAME, width, height, alpha=False)
    elif tuple(image.size) != (width, height):
        image.scale(width, height)
    return image


def _material(image: bpy.types.Image) -> bpy.types.Material:
    mat = bpy.data.materials.new("PVP_Plane")
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    nodes.clear()
    tex = nodes.new("ShaderNodeTexImage")
    tex.image, tex.interpolation, tex.extension = image, "Closest", "EXTEND"
    emission = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(tex.outputs["Color"], emission.inputs["Color"])
    links.new(emission.outputs["Emission"], out.inputs["Surface"])
    return mat


def view_height(cam, render, distance: float) -> float:
    """Height of the camera's view at a distance, as rendered (sensor fit and render aspect included)."""
    aspect = (render.resolution_x * render.pixel_aspect_x) / (render.resolution_y * render.pixel_aspect_y)
    fit = cam.sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if aspect >= 1 else "VERTICAL"
        sensor = cam.sensor_width
    else:
        sensor = cam.sensor_width if fit == "HORIZONTAL" else cam.sensor_height
    if cam.type == "ORTHO":
        extent = cam.ortho_scale
    else:
        extent = distance * sensor / cam.lens
    return extent / aspect if fit == "HORIZONTAL" else extent


def add_plane(context, image: bpy.types.Image, height_m: float = 0.3) -> bpy.types.Object:
    """A plane facing the active camera and filling 80% of its view height (beside the origin, facing
    the front view, when the scene has no camera); the user may move it afterwards."""
    w, h = image.size
    camera = context.scene.camera
    distance = 2.0
    if camera is not None and camera.type == "CAMERA":
        height_m = 0.8 * view_height(camera.data, context.scene.render, distance)
    half_w, half_h = height_m * w / h / 2, height_m / 2
    me = bpy.data.meshes.new(PLANE_NAME)
    me.from_pydata([(-half_w, -half_h, 0), (half_w, -half_h, 0), (half_w, half_h, 0), (-half_w, half_h, 0)], [],
                   [(0, 1, 2, 3)])
    uv = me.uv_layers.new(name="UVMap")
    for loop, co in zip(uv.data, [(0, 0), (1, 0), (1, 1), (0, 1)]):
        loop.uv = co
    me.materials.append(_material(image))
    ob = bpy.data.objects.new(PLANE_NAME, me)
    context.scene.collection.objects.link(ob)
    if camera is not None and camera.type == "CAMERA":
        rot = camera.matrix_world.to_quaternion()
        ob.rotation_mode = "QUATERNION"
        ob.rotation_quaternion = rot
        ob.location = camera.matrix_world.translation + rot @ Vector((0.0, 0.0, -distance))
    else:
        ob.rotation_euler = (math.pi / 2, 0.0, 0.0)
        ob.location = (0.45, 0.0, 0.25)
    return ob


def show_frame(image: bpy.types.Image, frame) -> None:
    """Put a received rgb8/rgba8 frame into the image (resized to it if needed)."""
    if tuple(image.size) != (frame.width, frame.height):
        image.scale(frame.width, frame.height)
    image.pixels.foreach_set(pixels_rgba(frame))
    image.update()
