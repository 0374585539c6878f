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
