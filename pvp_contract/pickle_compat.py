"""What restricted unpicklers need to read protocol-2 pickles (torch.save's default, Python 2 era files)
without running anything: Python 2 global names mapped to Python 3's, and bytes as protocol 2 stores them."""
from __future__ import annotations

import _compat_pickle
import pickle


def python3_global(module: str, name: str) -> tuple[str, str]:
    """A pickle global under its Python 3 name (``__builtin__.set`` -> ``builtins.set``), as pickle's own
    find_class maps it for protocol < 3."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how protocol 2 stores bytes (numpy arrays' data). No other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r} in _codecs.encode (only latin1 stores bytes)")
    return text.encode("latin1")
