"""Pack the Blender extension: pvp_blender-VERSION.zip (`python build_addon.py` in a checkout; `pvp demo`).

The zip holds the extension's modules (blender_addon/, installed as the package pvp_blender), the rig files
(rigs/, installed as pvp_rigs) and, listed in the manifest so that Blender installs them when
the extension is enabled: the pvp_contract package (control schema, wire protocol, client, driving-track
readers) as a pure wheel built here, and the pyzmq and msgpack wheels for Blender's Python (3.11) on every
platform that publishes them, fetched with pip into a cache folder (--wheels-cache).

    python build_addon.py                      # all platforms, into dist/
    python build_addon.py --platforms linux-x64
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.resources
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pvp import __version__

PYTHON_VERSION = "3.11"  # Blender 4.2 - 4.5
REQUIREMENTS = ("pyzmq==27.3.0", "msgpack==1.2.4")
# Blender platform -> pip platform tags (any of them)
PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "windows-x64": ("win_amd64",),
    "windows-arm64": ("win_arm64",),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_15_universal2", "macosx_10_9_x86_64"),
    "macos-arm64": ("macosx_11_0_arm64", "macosx_10_15_universal2", "macosx_10_9_universal2"),
}
CONTRACT = "pvp_contract"


class ExtensionBuildError(RuntimeError):
    """The extension could not be packed; the message says why."""


def installed_sources() -> tuple[Path, Path]:
    """The extension's source folder and its rigs folder, as the pvp package installed them."""
    return (Path(str(importlib.resources.files("pvp_blender"))), Path(str(importlib.resources.files("pvp_rigs"))))


def current_platform() -> str:
    """This machine's Blender platform name (e.g. linux-x64)."""
    import platform

    system = {"linux": "linux", "win32": "windows", "darwin": "macos"}.get(sys.platform, sys.platform)
    machine = {"x86_64": "x64", "amd64": "x64", "arm64": "arm64", "aarch64": "arm64"}.get(platform.machine().lower())
    name = f"{system}-{machine}"
    if name not in PLATFORMS:
        raise ExtensionBuildError(f"no wheels are published for this platform ({name})")
    return name


def fetch_wheels(platform: str, cache: Path) -> list[Path]:
    """The wheels of REQUIREMENTS for one Blender platform (downloaded once into cache/platform)."""
    folder = cache / platform
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {r.split("==")[0].lower(): r.split("==")[1] for r in REQUIREMENTS}
    have = {name: sorted(folder.glob(f"{name}-{ver}-*.whl")) for name, ver in wanted.items()}
    if not all(have.values()):  # into a folder of its own, then moved: a build beside it sees whole wheels only
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as partial:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                   "--abi", "none", "--dest", partial, *REQUIREMENTS]
            for tag in PLATFORMS[platform]:
                cmd += ["--platform", tag]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise ExtensionBuildError(f"pip could not fetch {', '.join(REQUIREMENTS)} for {platform}:\n"
                                          f"{result.stderr.strip()[-2000:]}")
            for wheel in Path(partial).glob("*.whl"):
                if not (folder / wheel.name).exists():  # one a build beside it moved in first may be open there
                    os.replace(wheel, folder / wheel.name)
        have = {name: sorted(folder.glob(f"{name}-{ver}-*.whl")) for name, ver in wanted.items()}
    missing = [name for name, files in have.items() if not files]
    if missing:
        raise ExtensionBuildError(f"no {missing} wheel for {platform} in {folder}")
    return [files[-1] for files in have.values()]


def contract_wheel(out_dir: Path, ver: str) -> Path:
    """The pvp_contract package as a pure-Python wheel (PEP 427): its modules, METADATA, WHEEL, RECORD."""
    info = f"{CONTRACT}-{ver}.dist-info"
    package = Path(str(importlib.resources.files(CONTRACT)))
    files = {f"{CONTRACT}/{src.name}": src.read_bytes() for src in sorted(package.glob("*.py"))}
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {CONTRACT}\nVersion: {ver}\n"
                                 "Summary: pvp's server-client contract: control schema, wire protocol, client, "
                                 "driving-track readers\nRequires-Python: >=3.11\n"
                                 "Requires-Dist: msgpack\nRequires-Dist: pyzmq\nRequires-Dist: numpy\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: pvp build_addon.py\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{CONTRACT}-{ver}-py3-none-any.whl"
    partial = target.with_name(f".{target.name}.{os.getpid()}")  # replaced whole: a build beside it reads no half
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
            for path, data in files.items():  # fixed dates: the same sources give the same wheel
                z.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def manifest(addon: Path, ver: str, wheels: list[str], platforms: list[str]) -> str:
    text = (addon / "blender_manifest.toml").read_text()
    text = re.sub(r'^version = "[^"]*"', f'version = "{ver}"', text, count=1, flags=re.M)
    head, sep, permissions = text.partition("[permissions]")
    listing = ",\n".join(f'  "./wheels/{w}"' for w in wheels)
    extra = f"platforms = [{', '.join(repr(p).replace(chr(39), chr(34)) for p in platforms)}]\n"
    extra += f"wheels = [\n{listing},\n]\n\n"
    return head.rstrip() + "\n" + extra + sep + permissions


def build(out_dir: Path, platforms: list[str], cache: Path, sources: tuple[Path, Path] | None = None) -> Path:
    """The zip in out_dir; ``sources``: (extension folder, rigs folder), default the installed ones."""
    addon, rigs = sources or installed_sources()
    ver = __version__
    wheels: dict[str, Path] = {}
    contract = contract_wheel(cache / "contract", ver)
    wheels[contract.name] = contract
    for platform in platforms:
        for w in fetch_wheels(platform, cache):
            wheels.setdefault(w.name, w)  # universal2 wheels serve both macOS platforms
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"pvp_blender-{ver}.zip"
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".zip.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("blender_manifest.toml", manifest(addon, ver, sorted(wheels), platforms))
            for src in sorted(addon.glob("*.py")):
                z.write(src, src.name)
            for rig in sorted(rigs.glob("*.json")):
                z.write(rig, f"rigs/{rig.name}")
            for name, path in sorted(wheels.items()):
                z.write(path, f"wheels/{name}")
        tmp_path.replace(target)
    finally:
        tmp_path.unlink(missing_ok=True)
    return target


def main(argv=None, sources: tuple[Path, Path] | None = None, default_out: Path = Path("dist")) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help=f"comma-separated Blender platforms, or 'current' (default all: {', '.join(PLATFORMS)})")
    ap.add_argument("--wheels-cache", type=Path, default=None, help="default: OUT/wheels")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.platforms.split(",") if p.strip()]
    unknown = [p for p in names if p not in PLATFORMS and p != "current"]
    if unknown:
        ap.error(f"unknown platforms {unknown}; choose from {', '.join(PLATFORMS)}")
    try:
        platforms = [current_platform() if p == "current" else p for p in names]
        print(build(args.out, platforms, args.wheels_cache or args.out / "wheels", sources))
    except ExtensionBuildError as e:
        print(f"build_addon.py: {e}", file=sys.stderr)
        return 1
    return 0
