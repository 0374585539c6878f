"""Rig descriptions (JSON) from which the Blender extension builds its rig: see README.md here."""
