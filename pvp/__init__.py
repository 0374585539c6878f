"""pvp: editable, animatable portrait avatars from one monocular video (PVP, EGSR 2023)."""

__version__ = "0.1.0"
