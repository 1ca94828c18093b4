"""The one LoKr codec and the one check of native factors, on numpy arrays (torch-free: the gateway uses it).

Training, inference and the CLI reach this module through thin torch wrappers (`lycoris.to_lycoris`,
`lycoris.from_lycoris`, `model.group_factors`), so every path converts a file to the same bytes and
refuses a bad file with the same ValueError. Names and shapes of a LoKr module are checked by
`keys.plan_lokr_module` and `_check_ranks` before anything is multiplied, so a file that is refused is never
widened or multiplied.

Untrusted files: ``read_safetensors_bytes`` parses the safetensors header itself, with caps (header length,
tensor count, dtypes, offsets that tile the data), before any tensor is touched, and returns read-only views of
the uploaded bytes: a crafted header costs milliseconds and no memory, and nothing is copied.

Dtypes: a factor keeps the dtype it has in the file (float16, bfloat16, float32 or float64). Arithmetic
(a low-rank product ``w_a @ w_b``, the alpha / rank scale) runs in float32, in float64 for float64
tensors, and is rounded once to the file's dtype. numpy has no bfloat16: here a bfloat16 tensor is an
array of the structured dtype ``BFLOAT16``, which holds the raw 16-bit patterns; ``widen`` turns it into
float32 exactly and ``narrow`` rounds back to nearest-even as torch does. ``read_safetensors_bytes`` and
``safetensors_bytes`` read and write such arrays as safetensors ``BF16``.
"""

from __future__ import annotations

import json
import math
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
    is_lokr_key,
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
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "NATIVE_FORMAT",
    "NUMPY",
    "NUMPY_DTYPES",
    "TORCH_DTYPE_SIZES",
    "ArrayLibrary",
    "TensorInfo",
    "adapter_bytes",
    "c_order",
    "dtype_name",
    "lycoris_arrays",
    "max_tensors_for",
    "narrow",
    "native_arrays_from_lycoris",
    "native_arrays_from_upload",
    "pair_factors",
    "parse_safetensors_header",
    "read_safetensors_bytes",
    "safetensors_bytes",
    "safetensors_header_length",
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


def _checked_lokr_module(name: str, fields: Mapping[str, np.ndarray]) -> float | None:
    """One LoKr module's dtypes (factor dtypes, both halves of a pair alike) and layout (a factor is full or a
    pair, never both) checked before any arithmetic; its alpha, or None."""
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
        halves = [f"lokr_{which}_{half}" for half in ("a", "b") if f"lokr_{which}_{half}" in fields]
        if f"lokr_{which}" in fields and halves:
            raise ValueError(
                f"{name}: has both lokr_{which} and {'/'.join(halves)}; a LoKr factor is either full or a "
                "low-rank pair, and a tensor no loader uses is not accepted"
            )
    if "alpha" not in fields:
        return None
    alpha_array = fields["alpha"]  # widened only once it is known to be one number
    return scalar_alpha(name, widen(alpha_array) if alpha_array.size == 1 else alpha_array)


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
    dtypes, alpha and shapes are all checked before any product is formed: the rank r of a pair w_a (m x r),
    w_b (r x n) is at most min(m, n), and a factor is either full or a pair (never both), so a module holds at
    most what its layer can use. Text-encoder modules, conv (Tucker) factors and DoRA scales are refused.
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
        alpha = _checked_lokr_module(name, fields)
        shapes = {field: tuple(array.shape) for field, array in fields.items()}
        layer_shape = None if layer_shapes is None else layer_shapes[path]
        plans[name] = (path, plan_lokr_module(name, shapes, alpha, layer_shape))
        _check_ranks(name, shapes)
    out: dict[str, np.ndarray] = {}
    for name, (path, (_, _, scale)) in plans.items():
        out[path + KRONA_A_SUFFIX] = _lokr_factor(modules[name], "w1", 1.0)
        out[path + KRONA_B_SUFFIX] = _lokr_factor(modules[name], "w2", scale)
    pair_factors(out)  # the same checks as a native file: pairs, 2-D, finite (a product may overflow)
    return out


def _check_ranks(name: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each low-rank pair ``w_a`` (m x r) @ ``w_b`` (r x n) has r <= min(m, n); ValueError otherwise.

    A larger rank factors nothing a smaller one could not (the product has rank <= min(m, n)); it only makes the
    pair hold r * (m + n) values where at most min(m, n) * (m + n) are of use, and the product cost r * m * n.
    Run on shapes alone (after ``plan_lokr_module`` checked them), so a refused file is never multiplied.
    """
    for which in ("w1", "w2"):
        down, up = shapes.get(f"lokr_{which}_a"), shapes.get(f"lokr_{which}_b")
        if down is None or up is None:
            continue
        (m, rank), (_, n) = down, up
        if rank > min(m, n):
            raise ValueError(
                f"{name}.lokr_{which}_a {down} @ lokr_{which}_b {up}: rank {rank:,} is over the limit of "
                f"{min(m, n):,} (the smaller side of the {m}x{n} factor they form); the pair holds "
                f"{rank * (m + n):,} values where at most {min(m, n) * (m + n):,} can be used"
            )


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


def _relabel_dtype(data: bytes | memoryview, keys: Iterable[str], header: dict[str, Any], dtype: str) -> bytes:
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


# safetensors dtype -> numpy dtype, for the dtypes numpy can hold (bfloat16 as BFLOAT16); any other dtype (float8,
# complex, sub-byte floats) is refused while reading.
NUMPY_DTYPES = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": BFLOAT16,
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
NUMPY_DTYPE_SIZES = {name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items()}
# What torch also holds (the CLI's and the workers' reader, ``io.read_safetensors``): float8 factors are read there
# and then refused with the same message as any other non-float factor.
TORCH_DTYPE_SIZES = {**NUMPY_DTYPE_SIZES, "F8_E4M3": 1, "F8_E5M2": 1}

# Limits for untrusted headers, checked before the JSON is parsed (header length, tensor count) or before any
# tensor is read. The largest supported UNet (SDXL) has 560 attention projections; a LoKr module has at most 7
# tensors (LOKR_FIELDS), so no adapter comes near 8,192 tensors. 1 MiB holds such a header (~150 bytes per
# tensor) with room for kohya's metadata; parsing 1 MiB of JSON takes ~20 ms.
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 8192
MAX_METADATA_ENTRIES = 1024
MAX_TENSOR_DIMS = 4  # conv and Tucker tensors are 4-D: read, then refused with a message that says why
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def max_tensors_for(layer_count: int) -> int:
    """The most tensors an adapter file for a base model with ``layer_count`` target layers can hold: a LoKr module
    has at most 7 (``lokr_w1``, ``lokr_w1_a``… ``alpha``), a native layer 2; plus a margin."""
    return min(MAX_TENSORS, len(LOKR_FIELDS) * layer_count + 64)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: dtype (safetensors name), shape and [start, end) in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_header_length(prefix: bytes, size: int, name: str = "file") -> int:
    """The header length a safetensors file of ``size`` bytes declares in its first 8 bytes ``prefix``; ValueError
    unless it fits the file and MAX_HEADER_BYTES."""
    if size < 8 or len(prefix) < 8:
        raise ValueError(f"{name} is not a safetensors file ({size} bytes)")
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len <= 0 or header_len > size - 8:
        raise ValueError(f"{name} is not a safetensors file (bad header length {header_len})")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(
            f"{name} has a {header_len:,}-byte safetensors header; adapter files have at most {MAX_HEADER_BYTES:,}"
        )
    return header_len


def _short(value: Any, limit: int = 120) -> str:
    """A key or value of an untrusted header for a message: its repr, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_short(key)}")
            seen.add(key)
    return obj


def parse_safetensors_header(
    header: bytes,
    data_size: int,
    name: str = "file",
    *,
    max_tensors: int = MAX_TENSORS,
    dtype_sizes: Mapping[str, int] = NUMPY_DTYPE_SIZES,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of the JSON ``header`` of a safetensors file whose data section is ``data_size`` bytes.

    Checks what the safetensors library checks, and caps what it does not, before any tensor is read: at most
    ``max_tensors`` tensors (counted before the JSON is parsed) and MAX_METADATA_ENTRIES string metadata entries,
    no duplicate keys, dtypes from ``dtype_sizes``, shapes of at most MAX_TENSOR_DIMS sizes whose byte size is the
    span of the tensor's data offsets, and tensors laid end to end over the whole data section (no overlap, no gap).
    ValueError naming the file, the tensor and the limit.
    """
    invalid = f"{name} is not a valid safetensors file"
    # Every tensor entry names "data_offsets"; counting the bytes is ~1 ms per MiB and builds nothing.
    declared = header.count(b'"data_offsets"')
    if declared > max_tensors:
        raise ValueError(
            f"{name} holds {declared:,} tensors; at most {max_tensors:,} are accepted (an adapter has at most "
            f"{len(LOKR_FIELDS)} per attention layer of the base model)"
        )
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{invalid}: its header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{invalid}: its header is not a JSON object")
    metadata = parsed.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{invalid}: __metadata__ must map strings to strings")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ValueError(
            f"{name} has {len(metadata):,} metadata entries; at most {MAX_METADATA_ENTRIES:,} are accepted"
        )
    if len(parsed) > max_tensors:
        raise ValueError(
            f"{name} holds {len(parsed):,} tensors; at most {max_tensors:,} are accepted (an adapter has at most "
            f"{len(LOKR_FIELDS)} per attention layer of the base model)"
        )
    tensors = {key: _tensor_entry(key, entry, data_size, dtype_sizes, name) for key, entry in parsed.items()}
    _check_laid_end_to_end(tensors, data_size, invalid)
    return tensors, metadata


def _tensor_entry(key: str, entry: Any, data_size: int, dtype_sizes: Mapping[str, int], name: str) -> TensorInfo:
    """One header entry checked: its fields, dtype, shape, and data offsets that span exactly its bytes."""
    invalid = f"{name} is not a valid safetensors file"
    if not isinstance(entry, dict) or set(entry) != _TENSOR_FIELDS:
        raise ValueError(f"{invalid}: {_short(key)} is not a tensor entry (dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtype_sizes:
        raise ValueError(
            f"{name} could not be read: {_short(key)} has dtype {_short(dtype)}; factors must be "
            f"{', '.join(FACTOR_DTYPES)}"
        )
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_count(d) for d in shape):
        raise ValueError(
            f"{invalid}: {_short(key)} has shape {_short(shape)}; a tensor here has at most {MAX_TENSOR_DIMS} "
            "sizes >= 0"
        )
    in_section = isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
    if not in_section or not offsets[0] <= offsets[1] <= data_size:
        raise ValueError(
            f"{invalid}: {_short(key)} has data offsets {_short(offsets)} outside the {data_size:,}-byte data section"
        )
    nbytes = math.prod(shape) * dtype_sizes[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(
            f"{invalid}: {_short(key)} is {dtype} {_short(tuple(shape))} ({_short(nbytes)} bytes) but its data "
            f"offsets span {offsets[1] - offsets[0]:,} bytes"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_laid_end_to_end(tensors: dict[str, TensorInfo], data_size: int, invalid: str) -> None:
    """The tensors cover the data section end to end: no overlap, no gap."""
    end = 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != end:
            raise ValueError(
                f"{invalid}: {_short(key)} starts at byte {info.start:,} of the data section, not {end:,} "
                "(tensors overlap or leave a gap)"
            )
        end = info.end
    if end != data_size:
        raise ValueError(f"{invalid}: its tensors end at byte {end:,} of the {data_size:,}-byte data section")


def read_safetensors_bytes(
    data: bytes, name: str = "file", *, max_tensors: int = MAX_TENSORS
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of a safetensors blob; ValueError if it is not one, or not one an adapter can be.

    The header is checked first (``parse_safetensors_header``: at most ``max_tensors`` tensors, dtypes numpy holds,
    offsets that tile the data), so a crafted header costs milliseconds and no memory. The arrays are read-only
    views of ``data`` (nothing is copied; BF16 tensors as ``BFLOAT16``).
    """
    header_len = safetensors_header_length(data[:8], len(data), name)
    data_start = 8 + header_len
    tensors, metadata = parse_safetensors_header(
        bytes(memoryview(data)[8:data_start]), len(data) - data_start, name, max_tensors=max_tensors
    )
    arrays = {}
    for key, info in tensors.items():
        flat = np.frombuffer(
            data, NUMPY_DTYPES[info.dtype], count=math.prod(info.shape), offset=data_start + info.start
        )
        arrays[key] = flat.reshape(info.shape)
    return arrays, metadata


def c_order(array: np.ndarray) -> np.ndarray:
    """``array`` in C order, copied only if it is not (np.ascontiguousarray would turn a 0-d alpha into (1,))."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors blob of ``arrays`` (``BFLOAT16`` ones written as BF16), keys sorted."""
    # lazy: loads safetensors
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
        if layer_shapes is not None:  # shapes first: a factor that cannot fit is refused before its values are read
            _check_native_shapes(native, layer_shapes)
    elif any(map(is_lokr_key, arrays)):
        native = native_arrays_from_lycoris(arrays, layer_shapes=layer_shapes)
        source = "lycoris"
    else:
        raise ValueError("the file is neither a Krona adapter (format krona/1) nor a LyCORIS LoKr file")
    pairs = pair_factors(native)
    if layer_shapes is not None:
        for path, (a, b) in pairs.items():
            _check_layer_fit(path, a.shape, b.shape, layer_shapes)
    if source == "krona" and "config" in metadata:
        config = KronaConfig.from_metadata(metadata["config"])
    else:
        a_shapes = [tuple(a.shape) for a, _ in pairs.values()]
        a1, a2 = max(set(a_shapes), key=a_shapes.count)
        config = KronaConfig(a1=a1, a2=a2, target_modules=tuple(sorted({short_name(p) for p in pairs})))
    return native, config, source


def _check_layer_fit(
    path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], layer_shapes: Mapping[str, tuple[int, int]]
) -> None:
    """ValueError unless ``path`` is a layer of ``layer_shapes`` and A (a_shape) ⊗ B (b_shape) has its shape."""
    if path not in layer_shapes:
        raise ValueError(f"{path} is not an attention projection of the base model")
    d_out, d_in = layer_shapes[path]
    if a_shape[0] * b_shape[0] != d_out or a_shape[1] * b_shape[1] != d_in:
        raise ValueError(
            f"{path}: A {a_shape} ⊗ B {b_shape} gives {a_shape[0] * b_shape[0]}x{a_shape[1] * b_shape[1]}, "
            f"the layer is {d_out}x{d_in}"
        )


def _check_native_shapes(arrays: Mapping[str, np.ndarray], layer_shapes: Mapping[str, tuple[int, int]]) -> None:
    """The layer check of `native_arrays_from_upload` for every complete 2-D A/B pair, by shapes alone; anything
    else is left to `pair_factors`, so that its messages stay the torch path's."""
    for key, a in arrays.items():
        if not key.endswith(KRONA_A_SUFFIX):
            continue
        path = key[: -len(KRONA_A_SUFFIX)]
        b = arrays.get(path + KRONA_B_SUFFIX)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim == 2 and b.ndim == 2:
            _check_layer_fit(path, tuple(a.shape), tuple(b.shape), layer_shapes)


def adapter_bytes(native: Mapping[str, np.ndarray], config: KronaConfig, metadata: Mapping[str, str]) -> bytes:
    """A native adapter file (the same layout `save_adapter` writes) as bytes, factors in their own dtype."""
    meta = {"base_model": "", "created_by": "krona", **metadata, "format": NATIVE_FORMAT, "config": config.to_json()}
    return safetensors_bytes(native, meta)
