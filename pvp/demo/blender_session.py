"""The demo's Blender step, headless: install the extension zip, connect to the server, add the rig, key it
from a driving track, render the timeline (fast path) into PNGs and an MP4, and save the .blend.

    python -m pvp.demo.blender_session --zip Z --endpoint E --track T --frames DIR --movie OUT.mp4
        [--blend scene.blend] [--fps 25] [--size 512]

Runs in its own process with Blender's user resources in a temporary folder; prints one JSON line
(``PVP_DEMO_RESULT {...}``) with the frame range and the rig's keyed controls per frame.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PKG = "bl_ext.user_default.pvp_blender"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", type=Path, required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--track", type=Path, required=True)
    ap.add_argument("--frames", type=Path, required=True)
    ap.add_argument("--movie", type=Path, required=True)
    ap.add_argument("--blend", type=Path)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--size", type=int, default=0, help="frame width of the render (0: the avatar's resolution)")
    args = ap.parse_args(argv)
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="pvp_demo_blender_")
    import bpy

    def check(result, what):
        if result != {"FINISHED"}:
            raise SystemExit(f"demo: Blender step failed at {what}: {result}")

    bpy.ops.wm.read_factory_settings(use_empty=True)
    check(bpy.ops.extensions.package_install_files(filepath=str(args.zip), repo="user_default",
                                                   enable_on_install=True), "installing the extension")
    ops = sys.modules[f"{PKG}.bl_ops"]
    prefs = ops.prefs()
    prefs.endpoint, prefs.timeout_s = args.endpoint, 60.0
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = max(1, round(args.fps)), max(1, round(args.fps)) / args.fps
    check(bpy.ops.pvp.connect(), "connecting")
    check(bpy.ops.pvp.add_rig(), "adding the rig")
    check(bpy.ops.pvp.import_track(filepath=str(args.track), start_frame=1, renormalize="NONE", resample=False,
                                   set_frame_range=True), "importing the driving track")
    reader = ops.rig_reader(scene)
    scene.pvp.output_dir = str(args.frames) + os.sep
    scene.pvp.output_size = args.size
    scene.pvp.movie_path = str(args.movie)
    check(bpy.ops.pvp.render_timeline(), "rendering the timeline")
    keyed = [reader.at([f])[0][0] for f in range(scene.frame_start, scene.frame_end + 1)]
    if args.blend:
        bpy.ops.wm.save_as_mainfile(filepath=str(args.blend))
    print("PVP_DEMO_RESULT " + json.dumps({"frame_start": scene.frame_start, "frame_end": scene.frame_end,
                                           "controls": keyed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
