import os
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")
# `pytest -n N` (pytest-xdist): the workers share the cores, in their own processes and in those they start; a
# worker's torch taking every core beside another's makes both slower than one after the other
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not the host's
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))
TEST_DATA = Path(__file__).resolve().parent / "data"  # real clips and a photo, with provenance (data/README.md)


@pytest.fixture(scope="session")
def real_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def d3_track(real_data):
    from pvp.tracking.tracker import track_video

    return track_video(real_data / "lp_d3.mp4", progress=False)


@pytest.fixture(scope="session")
def d12_track(real_data):
    from pvp.tracking.tracker import track_video

    return track_video(real_data / "lp_d12.mp4", progress=False)


@pytest.fixture(scope="session")
def avatar_dir(tmp_path_factory) -> Path:
    """A tiny random avatar (32 px, 4 expression coefficients, 9 controls), read-only for the tests."""
    from pvp.avatar import random_avatar

    d = tmp_path_factory.mktemp("avatar") / "random"
    random_avatar(resolution=32, expression_dim=4).save(d)
    return d


@pytest.fixture(scope="module")
def server(avatar_dir):
    """`pvp serve` of the tiny random avatar, for one test module."""
    from pvp.serve.process import ServerProcess

    srv = ServerProcess(avatar_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    """The Blender extension as build_addon.py writes it (wheels cached in dist/wheels between runs)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("addon")
    result = subprocess.run([sys.executable, str(root / "build_addon.py"), "--out", str(out), "--platforms", "current",
                             "--wheels-cache", str(root / "dist" / "wheels")],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())
