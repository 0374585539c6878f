"""Pack the Blender extension into dist/pvp_blender-VERSION.zip (grows with the Blender-extension issue)."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    sys.exit("build_addon.py: the Blender extension is not written yet (see the Blender-extension issue)")
