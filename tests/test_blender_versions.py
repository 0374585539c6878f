"""The extension on the oldest Blender it supports and on the newest bpy on PyPI, beside the full suite on
4.5 (test_blender_addon.py): tests/blender_smoke.py (install from the zip, connect, add the rig, import a
track, a live frame, the fast timeline render) runs in a Blender of each release against `pvp serve`, and
what it shows must be the server's renders.

4.2 LTS is the manifest's blender_version_min (legacy actions, no slots); 5.0 dropped Action.fcurves
(slotted actions only). Each release runs in a venv of its own, made once and kept under
$XDG_CACHE_HOME/pvp-test (~/.cache/pvp-test): `python -m venv`, then pip installs bpy (a Python 3.11 wheel
of ~350 MB) with numpy 1.26.4 (what both wheels were built against). The extension brings pyzmq, msgpack
and pvp_contract itself. pip must reach PyPI the first time; when it cannot, the test fails and says so.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pvp.images import load_rgb
from tests.helpers import assert_same_render, server_frame

# the oldest supported LTS (blender_manifest.toml: blender_version_min) and the newest bpy on PyPI
BPY_VERSIONS = ("4.2.23", "5.0.1")
SMOKE = Path(__file__).resolve().parent / "blender_smoke.py"


def bpy_python(version: str) -> Path:
    """The Python of a venv with bpy==version, made on first use (kept; a half-made one is redone)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pvp-test"
    venv = cache / f"bpy-{version}"
    if (venv / "ready").is_file():
        return venv / "bin" / "python"
    partial = cache / f"bpy-{version}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    pip = subprocess.run([str(partial / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          "--quiet", f"bpy=={version}", "numpy==1.26.4"], capture_output=True, text=True)
    if pip.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        errors = [line for line in pip.stderr.splitlines() if line.startswith("ERROR")] or pip.stderr.splitlines()
        pytest.fail(f"cannot install bpy=={version} (pip must reach PyPI): {' '.join(errors[-2:])}", pytrace=False)
    (partial / "ready").write_text(f"bpy=={version} numpy==1.26.4\n")
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)  # only bin/python is used, which a moved venv keeps
    return venv / "bin" / "python"


@pytest.mark.slow
@pytest.mark.parametrize("version", BPY_VERSIONS)
def test_smoke_on_blender_release(version, addon_zip, server, tmp_path):
    python = bpy_python(version)
    track = tmp_path / "take.csv"
    track.write_text("frame,head_yaw,head_pitch,jaw_open,jaw_lateral,exp_00\n"
                     "1,-20,4,2,-3,0.5\n2,0,0,8,0,-0.5\n3,20,-4,14,3,1.0\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp_path / "blender_user")}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(python), str(SMOKE), str(addon_zip), server.endpoint, str(track), str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads((out / "result.json").read_text())
    assert result["blender"].startswith(version)
    values = {int(f): v for f, v in result["values"].items()}
    assert sorted(values) == [1, 2, 3]
    np.testing.assert_allclose(values[3]["controls"][:5], [20, -4, 0, 14, 3], atol=1e-4)  # the track's keys
    renders = {f: server_frame(server.endpoint, v["controls"], v["edits"]) for f, v in values.items()}
    np.testing.assert_array_equal(np.load(out / "live.npy"), renders[result["live_frame"]])
    for f, want in renders.items():
        assert_same_render(load_rgb(out / "frames" / f"frame_{f:06d}.png"), want)
    assert not np.array_equal(renders[1], renders[3])
