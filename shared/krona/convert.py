"""Adapter files as numpy arrays: reading, validating and converting without torch (for the gateway).

The torch functions (`load_adapter`, `to_lycoris`, `from_lycoris`) are what training and inference
use; these mirror them on numpy arrays so that the HTTP gateway can check an upload and serve the
LyCORIS export without importing torch. Tests check both paths give identical files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from .config import KronaConfig
from .keys import (
    KRONA_A_SUFFIX,
    KRONA_B_SUFFIX,
    UNET_PREFIX,
    kohya_name,
    lycoris_can_rebuild,
    module_path_from_kohya,
    plan_lokr_module,
    scalar_alpha,
    short_name,
    split_state_dict_key,
)

__all__ = [
    "NATIVE_FORMAT",
    "adapter_bytes",
    "lycoris_arrays",
    "native_arrays_from_upload",
    "read_safetensors_bytes",
    "validate_native_arrays",
]

NATIVE_FORMAT = "krona/1"
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def read_safetensors_bytes(data: bytes, name: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of a safetensors blob; ValueError for anything that is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) < 8:
        raise ValueError(f"{name} is not a safetensors file ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8:
        raise ValueError(f"{name} is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = dict(header.get("__metadata__") or {})
        arrays = load(data)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"{name} is not a valid safetensors file: {exc}") from None
    except Exception as exc:  # e.g. bfloat16, which numpy cannot hold
        raise ValueError(f"{name} could not be read ({exc}); store factors as float16 or float32") from None
    return arrays, metadata


def validate_native_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (A, B): every path has both, 2-D floating factors, all finite."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        path, kind = split_state_dict_key(key)
        if array.ndim != 2:
            raise ValueError(f"{key} must be a 2-D tensor, got shape {tuple(array.shape)}")
        if array.dtype.type not in _FLOAT_DTYPES:
            raise ValueError(f"{key} must be a floating-point tensor, got {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"{key} contains NaN or infinite values")
        halves.setdefault(path, {})[kind] = array
    if not halves:
        raise ValueError("adapter holds no factors")
    pairs = {}
    for path, parts in halves.items():
        if set(parts) != {"krona_a", "krona_b"}:
            raise ValueError(f"{path} has no {({'krona_a', 'krona_b'} - set(parts)).pop()} factor")
        pairs[path] = (parts["krona_a"], parts["krona_b"])
    return pairs


def _lycoris_to_native(
    arrays: Mapping[str, np.ndarray], layer_shapes: Mapping[str, tuple[int, int]] | None
) -> dict[str, np.ndarray]:
    """LoKr arrays -> native factors. Names, dtypes and shapes are all checked before any product is formed."""
    known = None if layer_shapes is None else {p.replace(".", "_"): p for p in layer_shapes}
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        name, _, field = key.partition(".")
        if not field:
            raise ValueError(f"unexpected key {key!r} in a LoKr file")
        modules.setdefault(name, {})[field] = array
    plans = {}
    for name, fields in sorted(modules.items()):
        if not name.startswith(UNET_PREFIX):
            raise ValueError(f"{name}: only UNet modules ({UNET_PREFIX}…) are supported")
        if known is not None:
            flat = name[len(UNET_PREFIX) :]
            if flat not in known:
                raise ValueError(f"{name} names no attention projection of the base model")
            path = known[flat]
        else:
            path = module_path_from_kohya(name)
        for field, array in fields.items():
            if field != "alpha" and array.dtype.type not in _FLOAT_DTYPES:
                raise ValueError(f"{name}.{field} must be a floating-point tensor, got {array.dtype}")
        alpha = scalar_alpha(name, fields["alpha"]) if "alpha" in fields else None
        shapes = {field: tuple(array.shape) for field, array in fields.items()}
        layer_shape = None if layer_shapes is None else layer_shapes[path]
        plans[name] = (path, plan_lokr_module(name, shapes, alpha, layer_shape))
    out: dict[str, np.ndarray] = {}
    for name, (path, (_, _, scale)) in plans.items():
        fields = modules[name]
        w1 = _factor(fields, "w1")
        w2 = _factor(fields, "w2")
        out[path + KRONA_A_SUFFIX] = w1
        out[path + KRONA_B_SUFFIX] = (w2 * scale).astype(np.float32)
    return out


def _factor(fields: Mapping[str, np.ndarray], which: str) -> np.ndarray:
    if f"lokr_{which}" in fields:
        return fields[f"lokr_{which}"].astype(np.float32)
    return fields[f"lokr_{which}_a"].astype(np.float32) @ fields[f"lokr_{which}_b"].astype(np.float32)


def native_arrays_from_upload(
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    layer_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, np.ndarray], KronaConfig, str]:
    """(native arrays, config, source format) for an uploaded native or LyCORIS LoKr file.

    With ``layer_shapes`` (module path -> (d_out, d_in) of the base model's attention projections)
    every layer must exist there and A ⊗ B must have its shape.
    """
    if metadata.get("format") == NATIVE_FORMAT:
        native = dict(arrays)
        source = "krona"
    elif any(".lokr_w" in key for key in arrays):
        native = _lycoris_to_native(arrays, layer_shapes)
        source = "lycoris"
    else:
        raise ValueError("the file is neither a Krona adapter (format krona/1) nor a LyCORIS LoKr file")
    pairs = validate_native_arrays(native)
    if layer_shapes is not None:
        for path, (a, b) in pairs.items():
            if path not in layer_shapes:
                raise ValueError(f"{path} is not an attention projection of the base model")
            d_out, d_in = layer_shapes[path]
            if a.shape[0] * b.shape[0] != d_out or a.shape[1] * b.shape[1] != d_in:
                raise ValueError(
                    f"{path}: A {a.shape} ⊗ B {b.shape} gives {a.shape[0] * b.shape[0]}x{a.shape[1] * b.shape[1]}, "
                    f"the layer is {d_out}x{d_in}"
                )
    if source == "krona" and "config" in metadata:
        config = KronaConfig.from_metadata(metadata["config"])
    else:
        a_shapes = [tuple(a.shape) for a, _ in pairs.values()]
        a1, a2 = max(set(a_shapes), key=a_shapes.count)
        config = KronaConfig(a1=a1, a2=a2, target_modules=tuple(sorted({short_name(p) for p in pairs})))
    return native, config, source


def adapter_bytes(native: Mapping[str, np.ndarray], config: KronaConfig, metadata: Mapping[str, str]) -> bytes:
    """A native adapter file (the same layout `save_adapter` writes) as bytes."""
    from safetensors.numpy import save

    meta = {"base_model": "", "created_by": "krona", **metadata, "format": NATIVE_FORMAT, "config": config.to_json()}
    return save({k: np.ascontiguousarray(v) for k, v in sorted(native.items())}, metadata=meta)


def lycoris_arrays(native: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Native factors -> LoKr arrays (full w1 = A, w2 = B, alpha 1), and the layers LyCORIS's loader cannot rebuild."""
    out: dict[str, np.ndarray] = {}
    not_rebuildable = []
    for path, (a, b) in sorted(validate_native_arrays(native).items()):
        name = kohya_name(path)
        out[name + ".lokr_w1"] = np.ascontiguousarray(a)
        out[name + ".lokr_w2"] = np.ascontiguousarray(b)
        out[name + ".alpha"] = np.array(1.0, dtype=np.float32)
        if not lycoris_can_rebuild(a.shape, b.shape):
            not_rebuildable.append(path)
    return out, not_rebuildable
