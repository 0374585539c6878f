"""The extension's smoke run inside one Blender release (a bpy of its own, in a venv of its own), started by
tests/test_blender_versions.py: install from the zip, connect, add the rig, import a track, show a live
frame, render the timeline. Writes what it saw into OUT (result.json, live.npy, frames/) for the test to
compare with the server's renders; any failure exits non-zero with its traceback.

    python blender_smoke.py ADDON_ZIP ENDPOINT TRACK_CSV OUT
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers (numpy only)

from tests.helpers import install_extension, plane_pixels  # noqa: E402


def main(addon_zip: str, endpoint: str, track: str, out: str) -> None:
    import bpy

    out_dir = Path(out)
    install_extension(bpy, addon_zip)
    ops = sys.modules["bl_ext.user_default.pvp_blender.bl_ops"]
    prefs = ops.prefs()
    prefs.endpoint, prefs.timeout_s = endpoint, 20.0
    assert bpy.ops.pvp.connect() == {"FINISHED"}
    assert bpy.ops.pvp.add_rig() == {"FINISHED"}
    assert bpy.ops.pvp.import_track(filepath=track, start_frame=1, renormalize="NONE", resample=False,
                                    set_frame_range=True) == {"FINISHED"}
    scene = bpy.context.scene
    reader = ops.rig_reader(scene)
    values = {}
    for f in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(f)
        values[f] = reader.now()
    assert bpy.ops.pvp.sync() == {"FINISHED"}  # the live frame of the last frame
    np.save(out_dir / "live.npy", plane_pixels(scene.pvp.image))
    scene.pvp.output_dir = str(out_dir / "frames") + "/"
    assert bpy.ops.pvp.render_timeline() == {"FINISHED"}
    (out_dir / "result.json").write_text(json.dumps({
        "blender": bpy.app.version_string, "live_frame": scene.frame_current,
        "values": {f: {"controls": c, "edits": e} for f, (c, e) in values.items()}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
