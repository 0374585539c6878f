"""pvp's contract between the render server and its clients (the Blender extension among them).

Pure Python over msgpack, pyzmq and numpy (never torch): the control schema (``controls``), the wire
protocol (``protocol``), the client (``client``), the driving-track readers (``driving``), rotation
conventions (``geometry``) and atomic file writes (``atomic``). The server imports it; build_addon.py
ships it inside the Blender extension as a wheel.
"""
