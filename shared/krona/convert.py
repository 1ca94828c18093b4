"""The one LoKr codec and the one check of native factors, on numpy arrays (torch-free: the gateway uses it).

Training, inference and the CLI reach this module through thin torch wrappers (`lycoris.to_lycoris`,
`lycoris.from_lycoris`, `model.group_factors`), so every path converts a file to the same bytes and
refuses a bad file with the same ValueError. Names and shapes of a LoKr module are checked by
`keys.plan_lokr_module` before anything is multiplied.

Dtypes: a factor keeps the dtype it has in the file (float16, bfloat16, float32 or float64). Arithmetic
(a low-rank product ``w_a @ w_b``, the alpha / rank scale) runs in float32, in float64 for float64
tensors, and is rounded once to the file's dtype. numpy has no bfloat16: here a bfloat16 tensor is an
array of the structured dtype ``BFLOAT16``, which holds the raw 16-bit patterns; ``widen`` turns it into
float32 exactly and ``narrow`` rounds back to nearest-even as torch does. ``read_safetensors_bytes`` and
``safetensors_bytes`` read and write such arrays as safetensors ``BF16``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import KronaConfig
from .keys import (
    KRONA_A_SUFFIX,
    KRONA_B_SUFFIX,
    LOKR_FIELDS,
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
    "BFLOAT16",
    "FACTOR_DTYPES",
    "NATIVE_FORMAT",
    "NUMPY",
    "ArrayLibrary",
    "adapter_bytes",
    "c_order",
    "dtype_name",
    "lycoris_arrays",
    "narrow",
    "native_arrays_from_lycoris",
    "native_arrays_from_upload",
    "pair_factors",
    "read_safetensors_bytes",
    "safetensors_bytes",
    "unsupported_dtype_message",
    "validate_native_arrays",
    "widen",
]

NATIVE_FORMAT = "krona/1"
FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
# A bfloat16 tensor as numpy holds it: its 16-bit patterns, in a dtype that cannot be mistaken for integers.
BFLOAT16 = np.dtype([("bfloat16", "<u2")])


# Dtypes ---------------------------------------------------------------------------------------------


def dtype_name(array: np.ndarray) -> str:
    """``"float16"``, ``"bfloat16"``, ``"float32"``, ``"int32"``… for a numpy array."""
    return "bfloat16" if array.dtype == BFLOAT16 else array.dtype.name


def unsupported_dtype_message(key: str, dtype: str) -> str:
    """The refusal of a factor ``key`` of dtype ``dtype`` (shared by the numpy and torch paths)."""
    return f"{key} must be a floating-point tensor ({', '.join(FACTOR_DTYPES)}), got {dtype}"


def widen(array: np.ndarray) -> np.ndarray:
    """The array as float32 (float64 stays float64), exactly: the dtype arithmetic runs in."""
    if array.dtype == BFLOAT16:
        # A bfloat16 is the upper half of a float32.
        bits = array.view(np.uint16).reshape(-1).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(array.shape)
    if array.dtype == np.float64:
        return array
    return array.astype(np.float32)


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (or float64) ``values`` rounded once, to nearest with ties to even, to ``dtype``.

    Out-of-range values become infinite, as in torch's casts (the validation then refuses them).
    """
    if dtype == "bfloat16":
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        bits = flat.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
        rounded = np.where(np.isnan(flat), np.uint32(0x7FC0), rounded).astype(np.uint16)
        return rounded.view(BFLOAT16).reshape(np.shape(values))
    with np.errstate(over="ignore"):
        return np.asarray(values).astype(np.dtype(dtype))


def _all_finite(array: np.ndarray) -> bool:
    return bool(np.isfinite(widen(array)).all())


# Native factors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayLibrary:
    """What `pair_factors` needs to read an array of one library (numpy here, torch in `model.py`)."""

    is_array: Callable[[Any], bool]
    dtype_name: Callable[[Any], str]
    all_finite: Callable[[Any], bool]


NUMPY = ArrayLibrary(is_array=lambda x: isinstance(x, np.ndarray), dtype_name=dtype_name, all_finite=_all_finite)


def pair_factors(tensors: Mapping[str, Any], library: ArrayLibrary = NUMPY) -> dict[str, tuple[Any, Any]]:
    """Module path -> (A (a1 x a2), B (b1 x b2)) of a native state dict; ValueError with the first problem.

    Every key ends in ``.krona_a`` or ``.krona_b``, every path has both, every factor is a 2-D tensor of
    one of FACTOR_DTYPES and finite, and there is at least one pair. ``library`` says how to read the
    arrays, so that numpy arrays and torch tensors get the same checks and messages.
    """
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        path, kind = split_state_dict_key(key)
        if not library.is_array(tensor) or len(tensor.shape) != 2:
            shape = tuple(tensor.shape) if library.is_array(tensor) else type(tensor).__name__
            raise ValueError(f"{key} must be a 2-D tensor, got shape {shape}")
        dtype = library.dtype_name(tensor)
        if dtype not in FACTOR_DTYPES:
            raise ValueError(unsupported_dtype_message(key, dtype))
        if not library.all_finite(tensor):
            raise ValueError(f"{key} contains NaN or infinite values")
        halves.setdefault(path, {})[kind] = tensor
    if not halves:
        raise ValueError("adapter holds no factors")
    pairs = {}
    for path, parts in halves.items():
        if set(parts) != {"krona_a", "krona_b"}:
            raise ValueError(f"{path} has no {({'krona_a', 'krona_b'} - set(parts)).pop()} factor")
        pairs[path] = (parts["krona_a"], parts["krona_b"])
    return pairs


def validate_native_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (A, B) of native numpy factors (see `pair_factors`)."""
    return pair_factors(arrays)


# LoKr <-> native -------------------------------------------------------------------------------------


def lycoris_arrays(native: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Native factors -> kohya/LyCORIS LoKr arrays, and the layers LyCORIS's own loader cannot rebuild.

    ``<module path>.krona_a`` (a1 x a2) becomes ``lora_unet_<path with _>.lokr_w1``, ``.krona_b``
    becomes ``.lokr_w2`` (copies, in their dtype), plus ``.alpha`` = 1 (float32): with both factors
    full every loader applies scale 1 whatever alpha says, and LyCORIS refuses a module without it.
    """
    out: dict[str, np.ndarray] = {}
    not_rebuildable = []
    for path, (a, b) in sorted(pair_factors(native).items()):
        name = kohya_name(path)
        out[name + ".lokr_w1"] = np.array(a, copy=True, order="C")
        out[name + ".lokr_w2"] = np.array(b, copy=True, order="C")
        out[name + ".alpha"] = np.array(1.0, dtype=np.float32)
        if not lycoris_can_rebuild(tuple(a.shape), tuple(b.shape)):
            not_rebuildable.append(path)
    return out, not_rebuildable


def native_arrays_from_lycoris(
    arrays: Mapping[str, np.ndarray],
    *,
    module_paths: Iterable[str] | None = None,
    layer_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """kohya/LyCORIS LoKr arrays -> native factors ``<module path>.krona_a`` / ``.krona_b``.

    Full (``lokr_w1``) or low-rank (``lokr_w1_a @ lokr_w1_b``) factors; the alpha / rank scale is
    folded into B, so that A ⊗ B is what ComfyUI/A1111 apply at strength 1. A keeps w1's dtype, B
    w2's; the halves of a low-rank factor must share one. Module names may be diffusers-style
    (``lora_unet_down_blocks_0_…``) or original-SD style (``lora_unet_input_blocks_4_1_…``).
    ``module_paths`` (or the keys of ``layer_shapes``) are the paths a name may resolve to; with
    ``layer_shapes`` (path -> (d_out, d_in)) each w1 ⊗ w2 must also have its layer's shape. Names,
    dtypes, alpha and shapes are all checked before any product is formed; text-encoder modules,
    conv (Tucker) factors and DoRA scales are refused.
    """
    if module_paths is None and layer_shapes is not None:
        module_paths = layer_shapes
    known = None if module_paths is None else {p.replace(".", "_"): p for p in module_paths}
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        name, _, field = key.partition(".")
        if not field:
            raise ValueError(f"unexpected key {key!r} in a LoKr file")
        modules.setdefault(name, {})[field] = array
    plans = {}
    for name, fields in sorted(modules.items()):
        if not name.startswith(UNET_PREFIX):
            raise ValueError(
                f"{name}: only UNet modules ({UNET_PREFIX}…) are supported, not text-encoder or other modules"
            )
        path = module_path_from_kohya(name, known)
        for field, array in sorted(fields.items()):
            if field in LOKR_FIELDS and field != "alpha" and dtype_name(array) not in FACTOR_DTYPES:
                raise ValueError(unsupported_dtype_message(f"{name}.{field}", dtype_name(array)))
        for which in ("w1", "w2"):
            down, up = fields.get(f"lokr_{which}_a"), fields.get(f"lokr_{which}_b")
            if down is not None and up is not None and dtype_name(down) != dtype_name(up):
                raise ValueError(
                    f"{name}.lokr_{which}_a is {dtype_name(down)} but lokr_{which}_b is {dtype_name(up)}; "
                    "the halves of a low-rank factor must share one dtype"
                )
        alpha = scalar_alpha(name, widen(fields["alpha"])) if "alpha" in fields else None
        shapes = {field: tuple(array.shape) for field, array in fields.items()}
        layer_shape = None if layer_shapes is None else layer_shapes[path]
        plans[name] = (path, plan_lokr_module(name, shapes, alpha, layer_shape))
    out: dict[str, np.ndarray] = {}
    for name, (path, (_, _, scale)) in plans.items():
        out[path + KRONA_A_SUFFIX] = _lokr_factor(modules[name], "w1", 1.0)
        out[path + KRONA_B_SUFFIX] = _lokr_factor(modules[name], "w2", scale)
    pair_factors(out)  # the same checks as a native file: pairs, 2-D, finite (a product may overflow)
    return out


def _lokr_factor(fields: Mapping[str, np.ndarray], which: str, scale: float) -> np.ndarray:
    """scale * w (w full, or w_a @ w_b), computed wide and rounded once to the file's dtype."""
    full = fields.get(f"lokr_{which}")
    if full is not None:
        if scale == 1.0:
            return np.array(full, copy=True, order="C")
        return narrow(widen(full) * scale, dtype_name(full))
    down, up = fields[f"lokr_{which}_a"], fields[f"lokr_{which}_b"]
    with np.errstate(over="ignore", invalid="ignore"):
        return narrow(widen(down) @ widen(up) * scale, dtype_name(down))


# Files -------------------------------------------------------------------------------------------------


def _relabel_dtype(data: bytes | memoryview, keys: Iterable[str], header: dict, dtype: str) -> bytes:
    """The safetensors blob ``data`` with the dtype of ``keys`` in its (parsed) ``header`` set to ``dtype``.

    Only the header changes: BF16 and U16 tensors have the same bytes, so offsets stay valid.
    """
    header = dict(header)
    for key in keys:
        header[key] = {**header[key], "dtype": dtype}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors writes it
    header_len = int.from_bytes(bytes(data[:8]), "little")
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(data)[8 + header_len :]))


def read_safetensors_bytes(data: bytes, name: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of a safetensors blob (BF16 tensors as ``BFLOAT16``); ValueError if it is not one."""
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
        tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        bf16 = [k for k, v in tensors.items() if v.get("dtype") == "BF16"]
        arrays = load(_relabel_dtype(data, bf16, header, "U16") if bf16 else data)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{name} is not a valid safetensors file: {exc}") from None
    except Exception as exc:  # e.g. float8, which numpy cannot hold
        raise ValueError(f"{name} could not be read ({exc}); factors must be {', '.join(FACTOR_DTYPES)}") from None
    for key in bf16:
        arrays[key] = arrays[key].view(BFLOAT16)
    return arrays, metadata


def c_order(array: np.ndarray) -> np.ndarray:
    """``array`` in C order, copied only if it is not (np.ascontiguousarray would turn a 0-d alpha into (1,))."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors blob of ``arrays`` (``BFLOAT16`` ones written as BF16), keys sorted."""
    from safetensors.numpy import save

    bf16 = sorted(k for k, v in arrays.items() if v.dtype == BFLOAT16)
    plain = {k: c_order(v.view(np.uint16) if k in bf16 else v) for k, v in sorted(arrays.items())}
    data = save(plain, metadata=dict(metadata) if metadata is not None else None)
    if not bf16:
        return data
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return _relabel_dtype(data, bf16, header, "BF16")


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
        native = native_arrays_from_lycoris(arrays, layer_shapes=layer_shapes)
        source = "lycoris"
    else:
        raise ValueError("the file is neither a Krona adapter (format krona/1) nor a LyCORIS LoKr file")
    pairs = pair_factors(native)
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
    """A native adapter file (the same layout `save_adapter` writes) as bytes, factors in their own dtype."""
    meta = {"base_model": "", "created_by": "krona", **metadata, "format": NATIVE_FORMAT, "config": config.to_json()}
    return safetensors_bytes(native, meta)
