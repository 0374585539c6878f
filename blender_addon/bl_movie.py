"""Image sequence -> H.264 MP4 with Blender's own FFmpeg (a temporary scene with an image strip)."""
from __future__ import annotations

from pathlib import Path

import bpy


def encode_movie(files: list[Path], fps: float, path: Path) -> Path:
    if not files:
        raise ValueError("no frames to encode")
    first = bpy.data.images.load(str(files[0]), check_existing=False)
    width, height = first.size
    bpy.data.images.remove(first)
    scene = bpy.data.scenes.new("pvp_movie")
    try:
        editor = scene.sequence_editor_create()
        strips = getattr(editor, "strips", None) or editor.sequences  # 'sequences' before Blender 4.4
        strip = strips.new_image(name="frames", filepath=str(files[0]), channel=1, frame_start=1)
        for f in files[1:]:
            if f.parent != files[0].parent:
                raise ValueError(f"{f}: frames must share one folder")
            strip.elements.append(f.name)
        scene.frame_start, scene.frame_end = 1, len(files)
        scene.render.fps, scene.render.fps_base = max(1, round(fps)), max(1, round(fps)) / fps
        scene.render.resolution_x, scene.render.resolution_y = width + width % 2, height + height % 2
        scene.render.resolution_percentage = 100
        scene.render.image_settings.file_format = "FFMPEG"
        scene.render.ffmpeg.format, scene.render.ffmpeg.codec = "MPEG4", "H264"
        scene.render.ffmpeg.constant_rate_factor = "HIGH"
        scene.view_settings.view_transform = "Standard"
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.render.filepath = str(path)
        bpy.ops.render.render(animation=True, scene=scene.name)
    finally:
        bpy.data.scenes.remove(scene)
    return path
