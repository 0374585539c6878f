"""NVlabs stylegan2-ada-pytorch ``.pkl`` network snapshots (``G_ema``), e.g. ffhq.pkl as PTI uses it.

Those pickles embed the source code of their classes and normally execute it while loading
(torch_utils.persistence). This loader never does: a restricted unpickler rebuilds tensors and plain
data only, turns each persistent object into a record of its class name and state, and refuses every
other global with an error that names it.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from pvp.checkpoints.layout import CheckpointError, build_generator, check_shapes, expected_shapes, infer_config
from pvp.models.generator import blur_filter
from pvp_contract.pickle_compat import latin1_bytes, python3_global


@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would rebuild, without the code."""

    class_name: str
    state: dict


def _reconstruct_record(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed persistent object")
    return PersistentRecord(str(meta.get("class_name")), meta["state"])


def _load_storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_global(name):
    import numpy as np

    multiarray = np.core.multiarray  # numpy 1 and 2 both provide it (numpy 2 as an alias of numpy._core)
    return {"_reconstruct": multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype,
            "scalar": multiarray.scalar}[name]


_ALLOWED = {
    ("collections", "OrderedDict"): lambda: OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("_codecs", "encode"): lambda: latin1_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda: torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage,
    ("torch", "Size"): lambda: torch.Size,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): lambda: _reconstruct_record,
    ("dnnlib.util", "EasyDict"): lambda: dict,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),  # pickled under numpy 2
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy", "ndarray"): lambda: _numpy_global("ndarray"),
    ("numpy", "dtype"): lambda: _numpy_global("dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # protocol-2 pickles may name Python 2 modules (__builtin__.set); pickle's own find_class maps them
        module, name = python3_global(module, name)
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refused to load '{module}.{name}': only tensors, plain data and NVlabs persistent objects "
                "are accepted (the file may try to run code)")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by NVlabs pickles")


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load this pickle safely: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of networks, found {type(data).__name__}")
    return data


def flatten_state(record: PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a persistent module tree, keyed like its ``state_dict()``."""
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (record.state.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = torch.as_tensor(t).detach()
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, PersistentRecord):
            out.update(flatten_state(child, f"{prefix}{name}."))
        elif child is not None:
            raise CheckpointError(f"unexpected module type at {prefix}{name}: {type(child).__name__}")
    return out


def _child(record: PersistentRecord, *names: str) -> PersistentRecord | None:
    for name in names:
        record = (record.state.get("_modules") or {}).get(name)
        if not isinstance(record, PersistentRecord):
            return None
    return record


def _config_fields(G: PersistentRecord, source: str) -> dict:
    """What the tensors cannot tell: conv clamping, fp16 blocks, and the unsupported variants."""
    if int(G.state.get("c_dim", 0) or 0) > 0:
        raise CheckpointError(f"{source}: conditional generators (c_dim > 0) are not supported")
    synthesis = _child(G, "synthesis")
    if synthesis is None:
        raise CheckpointError(f"{source}: G_ema has no synthesis network")
    clamps, fp16 = set(), 0
    for name, block in (synthesis.state.get("_modules") or {}).items():
        if not isinstance(block, PersistentRecord):
            continue
        arch = block.state.get("architecture", "skip")
        if arch != "skip":
            raise CheckpointError(f"{source}: synthesis block {name} uses architecture {arch!r}; only 'skip' "
                                  "(StyleGAN2 config-f) is supported")
        fp16 += bool(block.state.get("use_fp16", False))
        for layer in ("conv0", "conv1", "torgb"):
            if (rec := _child(block, layer)) is not None:
                clamps.add(rec.state.get("conv_clamp"))
    if len(clamps) > 1:
        raise CheckpointError(f"{source}: layers use different conv_clamp values {sorted(map(str, clamps))}")
    mapping = _child(G, "mapping")
    lr_mul = _child(mapping, "fc0").state.get("bias_gain", 0.01) if mapping and _child(mapping, "fc0") else 0.01
    return dict(conv_clamp=clamps.pop() if clamps else None, num_fp16_res=fp16, mapping_lr_multiplier=float(lr_mul))


def load(path: Path, network: str = "G_ema"):
    source = str(path)
    try:
        return _load(source, read_pickle(path), network)
    except CheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:  # fields of unexpected types
        raise CheckpointError(f"{source}: not an NVlabs generator snapshot this loader understands "
                              f"({type(e).__name__}: {e})") from None


def _load(source: str, data: dict, network: str):
    G = data.get(network)
    if not isinstance(G, PersistentRecord):
        raise CheckpointError(f"{source}: no '{network}' network in this pickle (found {sorted(map(str, data))})")
    tensors = flatten_state(G)
    filters = {k: tensors.pop(k) for k in list(tensors) if k.endswith("resample_filter")}
    fields = _config_fields(G, source)
    cfg = infer_config({k: tuple(t.shape) for k, t in tensors.items()}, source, **fields)
    expected = expected_shapes(cfg)
    check_shapes({k: tuple(t.shape) for k, t in tensors.items()}, expected, source)
    for k, f in filters.items():
        if tuple(f.shape) != (4, 4) or not torch.allclose(f.float(), blur_filter()):
            raise CheckpointError(f"{source}: {k} is not the [1,3,3,1] filter this generator uses")
    return build_generator(cfg, tensors, source)

