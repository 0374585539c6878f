"""Timeline renders and fit jobs on Ray: local Ray with 2 CPU workers, the tiny random avatar."""
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from pvp.cli import main
from pvp.images import load_rgb
from pvp.serve import cluster
from pvp.serve.batch_render import Shot, render_shots, render_track, timeline_shots, track_shot
from pvp_contract.frames import MANIFEST, frame_path, read_manifest

ray = pytest.importorskip("ray", reason="the cluster extra (pip install 'pvp[cluster]')")
FRAMES = 12


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPU workers, no dashboard."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def track_file(d3_track, tmp_path_factory):
    path = tmp_path_factory.mktemp("track") / "t.safetensors"
    d3_track.select(slice(0, FRAMES)).save(path)
    return path


@pytest.fixture(scope="module")
def reference(avatar_dir, track_file, tmp_path_factory):
    """The single-process render of the track, in batches of 2."""
    out = tmp_path_factory.mktemp("reference")
    render_track(avatar_dir, track_file, out, batch=2, progress=False)
    return out


def _same_frames(folder, reference, frames):
    for f in frames:
        assert np.array_equal(load_rgb(frame_path(folder, f)), load_rgb(frame_path(reference, f))), f


def test_a_worker_killed_mid_render_loses_no_frame(local_ray, avatar_dir, track_file, reference, tmp_path):
    shot, _ = track_shot(avatar_dir, track_file, tmp_path / "out")
    shot.folder.mkdir()
    killed = []

    def kill_once(job, worker):
        # the worker that just finished a chunk has been handed its next one (and still holds another):
        # killing it now leaves chunks in flight that only Ray's restart and retry can finish
        if not killed and job.work:
            os.kill(job.pids[worker], signal.SIGKILL)
            killed.append(worker)

    job = cluster.ClusterRender([shot], workers=2, batch=2, device="cpu", on_chunk=kill_once)
    assert job.run(progress=False) == FRAMES
    assert killed and len(set(job.pids)) == 2  # two worker processes, one of them killed
    assert sorted(p.name for p in shot.folder.glob("frame_*.png")) == \
        [frame_path(shot.folder, f).name for f in range(FRAMES)]
    _same_frames(shot.folder, reference, range(FRAMES))
    assert read_manifest(shot.folder) == {str(f): k for f, k in shot.keys().items()}
    assert not list(shot.folder.glob(".*tmp*"))  # no half-written file left behind


def test_a_restarted_cluster_render_renders_only_what_is_missing(local_ray, avatar_dir, track_file, reference,
                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["render", str(avatar_dir), "--track", str(track_file), "-o", str(out), "--cluster", "local",
            "--batch", "2", "--device", "cpu"]
    assert main(argv) == 0
    assert f"rendered {FRAMES} frames" in capsys.readouterr().out
    stamps = {f: frame_path(out, f).stat().st_mtime_ns for f in range(FRAMES)}
    frame_path(out, 3).unlink()
    frame_path(out, 8).unlink()
    shot, _ = track_shot(avatar_dir, track_file, out)
    assert render_shots([shot], batch=2, progress=False, cluster="local") == 2
    assert all(frame_path(out, f).stat().st_mtime_ns == stamps[f] for f in range(FRAMES) if f not in (3, 8))
    _same_frames(out, reference, range(FRAMES))
    assert main(argv) == 0  # nothing missing: nothing rendered
    assert all(frame_path(out, f).stat().st_mtime_ns == stamps[f] for f in range(FRAMES) if f not in (3, 8))


def test_a_blender_timeline_of_two_shots_renders_on_the_cluster_as_in_one_process(local_ray, avatar_dir, tmp_path):
    from blender_addon.cluster_job import write_timeline
    from pvp.avatar import Avatar
    from pvp.edits import add_edit, discover

    avatar = tmp_path / "avatar"
    shutil.copytree(avatar_dir, avatar)
    (name, direction), = discover(Avatar.load(avatar), count=1, samples=200)
    add_edit(avatar, "tone", direction, "discovered", "test")
    rng = np.random.default_rng(0)
    channels = Avatar.load(avatar).meta.schema["channels"]
    frames = [(10 + f, [float(rng.uniform(c["min"], c["max"])) for c in channels], {"tone": 2.0} if f % 3 else {})
              for f in range(8)]
    here, there = tmp_path / "here", tmp_path / "there"
    write_timeline(there, frames, 24, Avatar.load(avatar).meta.id)
    shots = timeline_shots(avatar, there / "pvp_timeline.json", there)
    assert sorted(len(s.frames) for s in shots) == [3, 5]  # one shot per set of edits
    render_shots(timeline_shots(avatar, there / "pvp_timeline.json", here), batch=2, progress=False)
    assert main(["render", str(avatar), "--timeline", str(there / "pvp_timeline.json"), "-o", str(there),
                 "--cluster", "local", "--batch", "2", "--device", "cpu"]) == 0
    for f, _, _ in frames:
        img = load_rgb(frame_path(there, f))
        assert img.shape == (24, 24, 3) and np.array_equal(img, load_rgb(frame_path(here, f)))
    edited = Shot(avatar, [0], np.array([frames[1][1]], np.float32), tmp_path / "plain", {}, 24)
    render_shots([edited], progress=False)
    assert not np.array_equal(load_rgb(frame_path(there, 11)), load_rgb(frame_path(tmp_path / "plain", 0)))
    assert len(read_manifest(there)) == 8 and (there / MANIFEST).is_file()


def test_a_fit_job_runs_as_a_task_on_a_worker(local_ray, tmp_path):
    from pvp.fit.presets import PRESETS

    with cluster.connected("local"):  # the module's Ray, left running
        assert cluster.remote_call(lambda: os.getpid()) != os.getpid()  # another process: a worker
        bad = tmp_path / "clip.mp4"
        bad.write_bytes(b"not a video")
        with pytest.raises(Exception) as failed:  # the worker's own exception, not Ray's wrapper
            cluster.remote_call(cluster.fit_on_worker, dict(source=bad, avatar=tmp_path / "av",
                                                            preset=PRESETS["tiny"], progress=False), "cpu")
    assert not isinstance(failed.value, ray.exceptions.RayError)
    assert str(bad) in str(failed.value) and "\n" not in str(failed.value)


def _pvp_lines(err: str) -> list[str]:
    """stderr without the lines Ray's log streaming may print there meanwhile (an earlier test's worker
    failing on purpose: "(fit_on_worker pid=...) ...", "(raylet) ...")."""
    return [line for line in err.strip().splitlines() if not re.sub(r"\x1b\[[0-9;]*m", "", line).startswith("(")]


def test_bad_cluster_input_is_one_clear_line(avatar_dir, track_file, tmp_path, monkeypatch, capsys):
    argv = ["render", str(avatar_dir), "--track", str(track_file), "-o", str(tmp_path / "o")]
    assert main([*argv, "--cluster", "tcp://x:1"]) == 2
    assert _pvp_lines(capsys.readouterr().err) == \
        ["pvp render: error: --cluster tcp://x:1: expected auto, local or ray://HOST:PORT"]
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the cluster extra
    assert main([*argv, "--cluster", "ray://x:10001"]) == 2
    assert _pvp_lines(capsys.readouterr().err) == \
        ["pvp render: error: --cluster ray://x:10001: ray is not installed; pip install 'pvp[cluster]'"]
    monkeypatch.undo()
    # a head nobody runs: its own process (no Ray initialised there), one line, no traceback
    result = subprocess.run([sys.executable, "-m", "pvp.cli", *argv, "--cluster", "ray://127.0.0.1:9"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvp render: error: --cluster ray://127.0.0.1:9: cannot reach")
