"""The extension's cluster render (blender_addon/cluster_job.py) without Blender: the timeline file, the pvp
command beside Blender, progress from the manifest, failures in one line, cancel."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blender_addon.cluster_job import ClusterJob, ClusterRenderError, command
from pvp.avatar import AvatarMeta
from pvp.images import load_rgb
from pvp.serve.batch_render import render_shots, timeline_shots
from pvp_contract.frames import frame_key, frame_path, record

PVP = str(Path(sys.executable).with_name("pvp"))


def _frames(avatar_dir, n=6):
    channels = AvatarMeta.read(avatar_dir).schema["channels"]
    rng = np.random.default_rng(1)
    return [(1 + f, [float(rng.uniform(c["min"], c["max"])) for c in channels], {}) for f in range(n)]


def test_the_extension_renders_a_timeline_through_pvp_on_local_ray(avatar_dir, tmp_path):
    pytest.importorskip("ray", reason="the cluster extra (pip install 'pvp[cluster]')")
    frames, avatar_id = _frames(avatar_dir), AvatarMeta.read(avatar_dir).id
    job = ClusterJob(PVP, str(avatar_dir), "local", frames, tmp_path / "out", 16, avatar_id)
    assert job.run() == len(frames) == job.total and job.returncode == 0
    here = tmp_path / "here"  # the same timeline in this process
    render_shots(timeline_shots(avatar_dir, tmp_path / "out" / "pvp_timeline.json", here), progress=False)
    for f, _, _ in frames:
        assert np.array_equal(load_rgb(frame_path(tmp_path / "out", f)), load_rgb(frame_path(here, f)))


def test_progress_counts_the_frames_the_manifest_shows_as_asked(avatar_dir, tmp_path):
    frames, avatar_id = _frames(avatar_dir), AvatarMeta.read(avatar_dir).id
    out = tmp_path / "out"
    keys = {f: frame_key(c, e, None, avatar_id) for f, c, e in frames}
    record(out, {1: keys[1], 2: keys[2], 3: "another render"})  # frame 3 shows something else
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    job = ClusterJob(PVP, str(avatar_dir), "local", frames, out, None, avatar_id,
                     popen=lambda argv, **kw: subprocess.Popen(sleeper, **kw))
    assert (job.done, job.total, job.finished) == (2, 6, False)
    record(out, {4: keys[4]})
    job.read_at = 0.0  # as if POLL_S had passed
    assert job.step(0.0) == 1 and job.done == 3
    job.cancel()
    assert job.finished and job.process.returncode is not None  # the pvp process is gone


def test_failures_are_one_line(avatar_dir, tmp_path):
    frames = _frames(avatar_dir, 2)
    with pytest.raises(ClusterRenderError, match="cannot run '/no/such/pvp'"):
        ClusterJob("/no/such/pvp", str(avatar_dir), "local", frames, tmp_path / "a")
    job = ClusterJob(PVP, str(avatar_dir), "ray://127.0.0.1:9", frames, tmp_path / "b")
    with pytest.raises(ClusterRenderError) as failed:
        job.run()
    message = str(failed.value)
    assert "\n" not in message and message.startswith("pvp render: error: --cluster ray://127.0.0.1:9: cannot reach")
    assert "0 of 2 frames are written" in message


def test_the_command_names_the_timeline_the_folder_and_the_cluster(tmp_path):
    assert command("pvp", "/av", tmp_path / "t.json", tmp_path, "ray://head:10001") == \
        ["pvp", "render", "/av", "--timeline", str(tmp_path / "t.json"), "-o", str(tmp_path), "--cluster",
         "ray://head:10001"]
