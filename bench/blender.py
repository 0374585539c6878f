"""Blender image updates during cached playback at 256x256, and the main thread's time per frame change.

Runs the real Blender (bpy 4.5) with the extension installed from build_addon.py's zip, against a
`pvp serve` subprocess (a random avatar, frames resized to 256 by the server). The range is rendered once
into the add-on's cache (as prefetch does during playback), then frame_set() steps through it: each step
runs the add-on's frame-change handler, which finds the frame in the cache and writes it into the
plane's image. Target: >= 60 image updates per second.

    python bench/blender.py [--frames 120] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import print_table, write_results  # noqa: E402
from pvp.avatar import random_avatar  # noqa: E402
from pvp.serve.process import ServerProcess  # noqa: E402

PKG = "bl_ext.user_default.pvp_blender"


def build_zip(out: Path) -> Path:
    result = subprocess.run([sys.executable, str(ROOT / "build_addon.py"), "--out", str(out)], capture_output=True,
                            text=True, check=True)
    return Path(result.stdout.strip())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/blender.json)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="pvp_bench_blender_"))
    os.environ["BLENDER_USER_RESOURCES"] = str(tmp / "blender_user")
    zip_path = build_zip(tmp)
    random_avatar(resolution=64, expression_dim=8).save(tmp / "avatar")
    server = ServerProcess(tmp / "avatar", threads=None)
    try:
        import bpy

        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
        ops = sys.modules[f"{PKG}.bl_ops"]
        prefs = ops.prefs()
        prefs.endpoint, prefs.timeout_s, prefs.preview_size = server.endpoint, 60.0, args.size
        prefs.cache_mb = 1024
        bpy.ops.pvp.connect()
        bpy.ops.pvp.add_rig()
        scene = bpy.context.scene
        head = scene.pvp.rig.pose.bones["head"]
        scene.frame_start, scene.frame_end = 1, args.frames
        for frame, yaw in ((1, -25.0), (args.frames, 25.0)):
            head.rotation_euler = (0.0, yaw * 3.14159265 / 180, 0.0)
            head.keyframe_insert("rotation_euler", frame=frame)

        t0 = time.perf_counter()
        session, reader = ops.runtime.session, ops.rig_reader(scene)
        values = reader.at(range(1, args.frames + 1))
        for start in range(0, len(values), session.preview.max_in_flight):  # what prefetch does while playing
            session.preview.prefetch(values[start:start + session.preview.max_in_flight])
            ops.wait_until(lambda: not session.preview.in_flight, 120, scene)
        fill_s = time.perf_counter() - t0

        session.handler_ms.clear()
        image = scene.pvp.image
        updates = 0
        t0 = time.perf_counter()
        for f in list(range(1, args.frames + 1)) * 2:
            before = session.preview.shown
            scene.frame_set(f)  # runs the handler: cache hit -> the image is written now
            updates += session.preview.shown != before or f == 1
        elapsed = time.perf_counter() - t0
        handler = sorted(session.handler_ms)
        rows = [{"measure": "image updates per second, cached playback", "value": round(updates / elapsed, 1),
                 "unit": "1/s", "target": ">= 60"},
                {"measure": "main-thread time per frame change (handler), median", "value":
                 round(statistics.median(handler), 2), "unit": "ms", "target": "a few ms"},
                {"measure": "main-thread time per frame change (handler), p95", "value":
                 round(handler[int(0.95 * (len(handler) - 1))], 2), "unit": "ms", "target": ""},
                {"measure": "frame_set + handler + image write, mean",
                 "value": round(elapsed / (2 * args.frames) * 1e3, 2), "unit": "ms", "target": ""},
                {"measure": f"filling the cache ({args.frames} frames, server on CPU)", "value": round(fill_s, 1),
                 "unit": "s", "target": ""}]
        assert tuple(image.size) == (args.size, args.size)
        print_table(rows, ["measure", "value", "unit", "target"])
        print(write_results("blender", f"bpy {bpy.app.version_string}, {args.size}x{args.size}", rows, args.out))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
