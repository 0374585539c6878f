"""pvp wire protocol v1: msgpack over ZeroMQ multipart (documented in docs/protocol.md).

Pure Python: msgpack only (no numpy, no torch); the server, the client and the Blender extension share
this one module.

A message is one or two ZeroMQ frames: a msgpack map (the header), then, for frames of images, the
pixel or file bytes. Requests carry ``v`` (protocol version), ``type`` and ``id`` (the client's request
number, echoed in every reply to it).
"""
from __future__ import annotations

import math

import msgpack

VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # requests; ZMQ_MAXMSGSIZE on the server socket
MAX_CHANNELS = 1024
MAX_EDITS = 256
MAX_SEQUENCE = 4096
DEFAULT_CREDIT = 16  # the client library's window: frames of a sequence the server may send ahead of its reading
MAX_ID = 2**63 - 1
MIN_SIZE, MAX_SIZE = 16, 2048
MAX_CONTROL = 1.0e4  # magnitude; each channel is then clamped to its schema range
MAX_EDIT_STRENGTH = 100.0
FORMATS = ("rgb8", "rgba8", "jpeg", "png")
REQUEST_TYPES = ("hello", "ping", "face_mesh", "render", "render_sequence", "credit", "cancel")
REPLY_TYPES = ("info", "pong", "face_mesh", "frame", "done", "credited", "cancelled", "error")

# error codes
BAD_MESSAGE = "bad_message"  # not decodable msgpack, or not a map
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"
BUSY = "busy"  # this client already has as much work queued as the server holds for one client
INTERNAL = "internal"


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack(data: bytes) -> dict:
    """Decode a header with bounded sizes; anything malformed raises ProtocolError(bad_message)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(TOO_LARGE, f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    # every element takes at least a byte: no declared length can exceed the message's own size, so nothing
    # is preallocated beyond it, and over-long lists reach validate_request, which answers with the id
    limits = dict(max_str_len=64 * 1024, max_bin_len=len(data), max_array_len=len(data), max_map_len=len(data),
                  max_ext_len=0)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **limits)
    except Exception as e:  # msgpack raises several types for corrupt or oversized input
        raise ProtocolError(BAD_MESSAGE, f"not a msgpack message ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a map, got {type(obj).__name__}")
    return obj


# --- field checks ------------------------------------------------------------------------------------

def _number(value, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(INVALID_FIELD, f"{field} must be a number", field)
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError(INVALID_FIELD, f"{field} must be finite", field)
    if not lo <= value <= hi:
        raise ProtocolError(INVALID_FIELD, f"{field} must lie in [{lo:g}, {hi:g}]", field)
    return value


def _int(value, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(INVALID_FIELD, f"{field} must be an integer", field)
    if not lo <= value <= hi:
        raise ProtocolError(INVALID_FIELD, f"{field} must lie in [{lo}, {hi}]", field)
    return value


def _check_controls_length(value, field: str, channels: int | None) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHANNELS:
        raise ProtocolError(INVALID_FIELD, f"{field} must be a list of 1..{MAX_CHANNELS} numbers", field)
    if channels is not None and len(value) != channels:
        raise ProtocolError(INVALID_FIELD, f"{field} has {len(value)} values; this avatar takes {channels} (see "
                            "info.avatar.control_schema)", field)


def _controls(value, field: str) -> list[float]:
    return [_number(v, f"{field}[{i}]", -MAX_CONTROL, MAX_CONTROL) for i, v in enumerate(value)]


def _edits(value, field: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_EDITS:
        raise ProtocolError(INVALID_FIELD, f"{field} must be a map of at most {MAX_EDITS} name: strength", field)
    out = {}
    for name, strength in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ProtocolError(INVALID_FIELD, f"{field} names must be strings of 1..64 characters", field)
        out[name] = _number(strength, f"{field}.{name}", -MAX_EDIT_STRENGTH, MAX_EDIT_STRENGTH)
    return out


def _output(msg: dict) -> dict:
    fmt = msg.get("format", "rgb8")
    if fmt not in FORMATS:
        raise ProtocolError(INVALID_FIELD, f"format must be one of {', '.join(FORMATS)}", "format")
    size = msg.get("size")
    out = {"format": fmt, "size": None if size is None else _int(size, "size", MIN_SIZE, MAX_SIZE)}
    out["quality"] = _int(msg.get("quality", 90), "quality", 1, 100)
    return out


def request_id(msg: dict) -> int | None:
    """The request's id when it is a valid one (error replies echo it), else None."""
    value = msg.get("id")
    return value if type(value) is int and 0 <= value <= MAX_ID else None


def validate_request(msg: dict, channels: int | None = None) -> dict:
    """Check a decoded request; return a normalised copy (defaults filled in) or raise ProtocolError.
    ``channels``: the avatar's control count, checked before any value is read."""
    if type(msg.get("v")) is not int or msg["v"] != VERSION:  # 1.0 and True are not version 1
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {msg.get('v')!r} is not supported (this is "
                            f"version {VERSION})", "v")
    kind = msg.get("type")
    if kind not in REQUEST_TYPES:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {kind!r}", "type")
    out = {"v": VERSION, "type": kind, "id": _int(msg.get("id"), "id", 0, MAX_ID)}
    if kind == "render":
        _check_controls_length(msg.get("controls"), "controls", channels)
        out["controls"] = _controls(msg.get("controls"), "controls")
        out["edits"] = _edits(msg.get("edits"), "edits")
        out.update(_output(msg))
    elif kind == "render_sequence":
        frames = msg.get("frames")
        if not isinstance(frames, list) or not 1 <= len(frames) <= MAX_SEQUENCE:
            raise ProtocolError(INVALID_FIELD, f"frames must be a list of 1..{MAX_SEQUENCE} control lists", "frames")
        for i, f in enumerate(frames):  # every length before any value: a wrong request fails fast
            _check_controls_length(f, f"frames[{i}]", channels)
        out["frames"] = [_controls(f, f"frames[{i}]") for i, f in enumerate(frames)]
        out["edits"] = _edits(msg.get("edits"), "edits")
        out["first_seq"] = _int(msg.get("first_seq", 0), "first_seq", 0, MAX_ID)
        # no credit field (clients before flow control): no credit limit; the server still renders only as
        # fast as the client reads
        out["credit"] = None if msg.get("credit") is None else _int(msg["credit"], "credit", 1, MAX_SEQUENCE)
        out.update(_output(msg))
    elif kind == "credit":
        out["target"] = _int(msg.get("target"), "target", 0, MAX_ID)
        out["frames"] = _int(msg.get("frames"), "frames", 1, MAX_SEQUENCE)
    elif kind == "cancel":
        out["target"] = _int(msg.get("target"), "target", 0, MAX_ID)
    return out


# --- builders (clients) --------------------------------------------------------------------------------

def request(kind: str, request_id: int, **fields) -> bytes:
    return pack({"v": VERSION, "type": kind, "id": request_id, **fields})


def error_reply(code: str, message: str, request_id=None, field: str | None = None) -> dict:
    return {"v": VERSION, "type": "error", "id": request_id, "code": code, "message": message, "field": field}


def frame_header(request_id: int, width: int, height: int, fmt: str, seq: int | None = None,
                 clamped: list[str] | None = None) -> dict:
    """``clamped``: the control channels this frame's request set beyond the avatar's learned range."""
    header = {"v": VERSION, "type": "frame", "id": request_id, "width": width, "height": height, "format": fmt}
    if seq is not None:
        header["seq"] = seq
    if clamped:
        header["clamped"] = clamped
    return header

