"""Pack the Blender extension: dist/pvp_blender-VERSION.zip.

The zip holds blender_addon/, the server project's shared pure-Python modules (protocol, client, atomic,
driving, geometry), the rigs/ files, and the pyzmq and msgpack wheels for Blender's Python (3.11) on every
platform that publishes them, fetched with pip into a cache folder (--wheels-cache) and listed in the
manifest, so Blender installs the right ones when the extension is enabled.

    python build_addon.py                      # all platforms
    python build_addon.py --platforms linux-x64
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
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
SHARED_MODULES = {"protocol.py": "pvp_server/protocol.py", "client.py": "pvp_server/client.py",
                  "atomic.py": "pvp_server/atomic.py",
                  "driving.py": "pvp_server/driving.py", "geometry.py": "pvp_server/tracking/geometry.py"}


def current_platform() -> str:
    """This machine's Blender platform name (e.g. linux-x64)."""
    import platform

    system = {"linux": "linux", "win32": "windows", "darwin": "macos"}.get(sys.platform, sys.platform)
    machine = {"x86_64": "x64", "amd64": "x64", "arm64": "arm64", "aarch64": "arm64"}.get(platform.machine().lower())
    name = f"{system}-{machine}"
    if name not in PLATFORMS:
        raise SystemExit(f"build_addon.py: no wheels are published for this platform ({name})")
    return name


def version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def fetch_wheels(platform: str, cache: Path) -> list[Path]:
    """The wheels of REQUIREMENTS for one Blender platform (downloaded once into cache/platform)."""
    folder = cache / platform
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {r.split("==")[0].lower(): r.split("==")[1] for r in REQUIREMENTS}
    have = {name: sorted(folder.glob(f"{name}-{ver}-*.whl")) for name, ver in wanted.items()}
    if not all(have.values()):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
               "--abi", "none", "--dest", str(folder), *REQUIREMENTS]
        for tag in PLATFORMS[platform]:
            cmd += ["--platform", tag]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"build_addon.py: pip could not fetch {', '.join(REQUIREMENTS)} for {platform}:\n"
                             f"{result.stderr.strip()[-2000:]}")
        have = {name: sorted(folder.glob(f"{name}-{ver}-*.whl")) for name, ver in wanted.items()}
    missing = [name for name, files in have.items() if not files]
    if missing:
        raise SystemExit(f"build_addon.py: no {missing} wheel for {platform} in {folder}")
    return [files[-1] for files in have.values()]


def manifest(ver: str, wheels: list[str], platforms: list[str]) -> str:
    text = (ROOT / "blender_addon" / "blender_manifest.toml").read_text()
    text = re.sub(r'^version = "[^"]*"', f'version = "{ver}"', text, count=1, flags=re.M)
    head, sep, permissions = text.partition("[permissions]")
    listing = ",\n".join(f'  "./wheels/{w}"' for w in wheels)
    extra = f"platforms = [{', '.join(repr(p).replace(chr(39), chr(34)) for p in platforms)}]\n"
    extra += f"wheels = [\n{listing},\n]\n\n"
    return head.rstrip() + "\n" + extra + sep + permissions


def build(out_dir: Path, platforms: list[str], cache: Path) -> Path:
    ver = version()
    wheels: dict[str, Path] = {}
    for platform in platforms:
        for w in fetch_wheels(platform, cache):
            wheels.setdefault(w.name, w)  # universal2 wheels serve both macOS platforms
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"pvp_blender-{ver}.zip"
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".zip.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("blender_manifest.toml", manifest(ver, sorted(wheels), platforms))
            for src in sorted((ROOT / "blender_addon").glob("*.py")):
                z.write(src, src.name)
            for name, src in SHARED_MODULES.items():
                z.write(ROOT / src, name)
            for rig in sorted((ROOT / "rigs").glob("*.json")):
                z.write(rig, f"rigs/{rig.name}")
            for name, path in sorted(wheels.items()):
                z.write(path, f"wheels/{name}")
        tmp_path.replace(target)
    finally:
        tmp_path.unlink(missing_ok=True)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help=f"comma-separated Blender platforms, or 'current' (default all: {', '.join(PLATFORMS)})")
    ap.add_argument("--wheels-cache", type=Path, default=ROOT / "dist" / "wheels")
    args = ap.parse_args(argv)
    platforms = [current_platform() if p.strip() == "current" else p.strip() for p in args.platforms.split(",")
                 if p.strip()]
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        ap.error(f"unknown platforms {unknown}; choose from {', '.join(PLATFORMS)}")
    print(build(args.out, platforms, args.wheels_cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
