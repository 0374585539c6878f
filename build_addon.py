"""Pack the Blender extension from this checkout: dist/pvp_blender-VERSION.zip (see pvp/extension.py).

    python build_addon.py                      # all platforms
    python build_addon.py --platforms current
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from pvp.extension import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sources=(ROOT / "blender_addon", ROOT / "rigs"), default_out=ROOT / "dist"))
