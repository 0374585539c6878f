import os
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.is_dir():  # a checkout elsewhere: the shared clips sit beside the repository
    SHARED_DATA = Path(os.environ.get("PVP_SHARED_DATA", "../shared/data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "lp_d3.mp4").is_file():
        pytest.fail(f"the shared test clips are missing at {SHARED_DATA} (set PVP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def d3_track(shared_data):
    from pvp_server.tracking.tracker import track_video

    return track_video(shared_data / "lp_d3.mp4", progress=False)


@pytest.fixture(scope="session")
def d12_track(shared_data):
    from pvp_server.tracking.tracker import track_video

    return track_video(shared_data / "lp_d12.mp4", progress=False)


@pytest.fixture(scope="session")
def avatar_dir(tmp_path_factory) -> Path:
    """A tiny random avatar (32 px, 4 expression coefficients, 9 controls), read-only for the tests."""
    from pvp_server.avatar import random_avatar

    d = tmp_path_factory.mktemp("avatar") / "random"
    random_avatar(resolution=32, expression_dim=4).save(d)
    return d


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    """The Blender extension as build_addon.py writes it (wheels cached in dist/wheels between runs)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("addon")
    result = subprocess.run([sys.executable, str(root / "build_addon.py"), "--out", str(out)], capture_output=True,
                            text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


@pytest.fixture(scope="session")
def addon_package(addon_zip, tmp_path_factory):
    """The extension's modules importable outside Blender as ``pvp_blender`` (the pure ones need no bpy)."""
    import sys
    import zipfile

    folder = tmp_path_factory.mktemp("addon_pkg")
    with zipfile.ZipFile(addon_zip) as z:
        z.extractall(folder / "pvp_blender")
    sys.path.insert(0, str(folder))
    import pvp_blender

    return pvp_blender
