"""Key and module-path conventions, torch-free (the gateway validates uploaded files with them)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "KRONA_A_SUFFIX",
    "KRONA_B_SUFFIX",
    "LOKR_FIELDS",
    "MAX_FACTOR_ELEMENTS",
    "UNET_PREFIX",
    "is_lokr_key",
    "kohya_name",
    "lycoris_can_rebuild",
    "lycoris_factorization",
    "module_path_from_kohya",
    "plan_lokr_module",
    "scalar_alpha",
    "short_name",
    "split_state_dict_key",
]

KRONA_A_SUFFIX = ".krona_a"
KRONA_B_SUFFIX = ".krona_b"
UNET_PREFIX = "lora_unet_"
LOKR_FACTOR_MARK = ".lokr_w"  # in every factor key of a kohya/LyCORIS LoKr file: .lokr_w1, .lokr_w2_a, …


def is_lokr_key(key: str) -> bool:
    """Whether a state-dict key is a LoKr factor (``….lokr_w1``, ``….lokr_w2_b``): what tells a LyCORIS LoKr file."""
    return LOKR_FACTOR_MARK in key


def short_name(path: str) -> str:
    """The name a target list uses for a module path: ``…attn1.to_q`` -> ``to_q``, ``…to_out.0`` -> ``to_out.0``."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def split_state_dict_key(key: str) -> tuple[str, str]:
    """``"a.b.to_q.krona_a"`` -> ``("a.b.to_q", "krona_a")``; ValueError for any other suffix."""
    for suffix in (KRONA_A_SUFFIX, KRONA_B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    raise ValueError(f"unexpected key {key!r}: adapter keys end in {KRONA_A_SUFFIX} or {KRONA_B_SUFFIX}")


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_…_to_q``."""
    return UNET_PREFIX + module_path.replace(".", "_")


# Names of diffusers UNet modules that contain '_' (so that '_'-joined kohya names can be split again).
_COMPOUND_NAMES = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_in",
    "proj_out",
    "time_emb_proj",
    "conv_shortcut",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "class_embedding",
    "conv_in",
    "conv_out",
    "conv_norm_out",
)
_COMPOUND_TOKENS = sorted((tuple(n.split("_")) for n in _COMPOUND_NAMES), key=len, reverse=True)
# The original Stable Diffusion (LDM/SGM) names that kohya uses for SDXL files: the attention of
# input block i is down_blocks[(i-1)//3].attentions[(i-1)%3], the same rule for SD 1.x/2.x and SDXL.
_LDM_INPUT = re.compile(r"^input_blocks_(\d+)_1_(.+)$")
_LDM_MIDDLE = re.compile(r"^middle_block_1_(.+)$")
_LDM_OUTPUT = re.compile(r"^output_blocks_(\d+)_1_(.+)$")


def _split_diffusers_name(flat: str) -> str:
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for compound in _COMPOUND_TOKENS:
            if tuple(tokens[i : i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def module_path_from_kohya(name: str, known_paths: Mapping[str, str] | None = None) -> str:
    """``lora_unet_down_blocks_0_…_to_q`` (diffusers or original-SD naming) -> the diffusers module path."""
    flat = name[len(UNET_PREFIX) :]
    if known_paths is not None:
        if flat not in known_paths:
            raise ValueError(f"{name} names no linear layer of the given model")
        return known_paths[flat]
    rewrites: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
        (_LDM_INPUT, lambda m: f"down_blocks_{(int(m[1]) - 1) // 3}_attentions_{(int(m[1]) - 1) % 3}_{m[2]}"),
        (_LDM_MIDDLE, lambda m: f"mid_block_attentions_0_{m[1]}"),
        (_LDM_OUTPUT, lambda m: f"up_blocks_{int(m[1]) // 3}_attentions_{int(m[1]) % 3}_{m[2]}"),
    )
    for pattern, build in rewrites:
        match = pattern.match(flat)
        if match:
            flat = build(match)
            break
    else:
        if flat.startswith(("input_blocks", "middle_block", "output_blocks")):
            raise ValueError(f"{name}: only attention layers of LDM-named files are supported")
    return _split_diffusers_name(flat)


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n (port of lycoris.functional.factorization)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lycoris_can_rebuild(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """Whether LyCORIS's kohya loader rebuilds a module with full w1 = A (a_shape) and w2 = B (b_shape).

    Mirrors LokrModule.make_module_from_state_dict: it picks one ``factor`` and rebuilds
    w1 = (factorization(d_out, factor)[0], factorization(d_in, factor)[0]); the copy succeeds only
    if that equals A's shape.
    """
    (a1, a2), (b1, b2) = a_shape, b_shape
    d_out, d_in = a1 * b1, a2 * b2
    if a1 == lycoris_factorization(d_out)[0] and a2 == lycoris_factorization(d_in)[0]:
        factor = -1
    else:
        group_out, group_in = (a1, b1), (a2, b2)
        factor1, factor2 = max(a_shape), max(b_shape)
        factor = min(factor1, factor2)
        for f in (factor1, factor2):
            if d_out % f == 0 and d_in % f == 0 and f in group_out and f in group_in:
                factor = f
                break
    rebuilt = (lycoris_factorization(d_out, factor)[0], lycoris_factorization(d_in, factor)[0])
    return rebuilt == (a1, a2)


# LoKr modules from untrusted files ----------------------------------------------------------------

LOKR_FIELDS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})
# No factor of a real attention projection comes near this (SDXL's largest layer, 1280 x 2048, has 2.6M
# weights); it bounds what a low-rank pair may expand to before anything is multiplied.
MAX_FACTOR_ELEMENTS = 1 << 22


def _full_shape(name: str, fields: Mapping[str, tuple[int, ...]], which: str) -> tuple[tuple[int, int], int | None]:
    """(shape of w1 or w2, rank or None) from the tensors' shapes alone: nothing is multiplied here."""
    full, down, up = f"lokr_{which}", f"lokr_{which}_a", f"lokr_{which}_b"
    if full in fields:
        shape = fields[full]
        if len(shape) != 2:
            raise ValueError(f"{name}.{full} must be 2-D (linear layers only), got shape {shape}")
        return (shape[0], shape[1]), None
    if down in fields and up in fields:
        a, b = fields[down], fields[up]
        if len(a) != 2 or len(b) != 2:
            raise ValueError(f"{name}.{down}/{up} must be 2-D (linear layers only), got shapes {a} and {b}")
        if a[1] != b[0]:
            raise ValueError(f"{name}.{down} {a} and {up} {b} cannot be multiplied (inner sizes differ)")
        if a[1] < 1:
            raise ValueError(f"{name}.{down}/{up} have rank 0; a low-rank factor needs rank >= 1")
        return (a[0], b[1]), a[1]
    raise ValueError(f"{name}: has neither {full} nor {down}/{up} (is it a LoKr module?)")


def plan_lokr_module(
    name: str,
    shapes: Mapping[str, tuple[int, ...]],
    alpha: float | None,
    layer_shape: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int], float]:
    """Check one LoKr module of an untrusted file by its tensors' shapes, before any arithmetic.

    ``shapes`` maps the module's fields (``lokr_w1``, ``lokr_w2_a``, ``alpha``…) to tensor shapes;
    ``alpha`` is its value (already checked to be a finite scalar) or None. Returns (w1 shape,
    w2 shape, scale), where scale = alpha / rank when a factor is low-rank, else 1. With
    ``layer_shape`` = (d_out, d_in) of the target layer, w1 ⊗ w2 must have exactly that shape.
    ValueError for anything else, so that a crafted file cannot make the reader allocate a huge product.
    """
    unsupported = set(shapes) - LOKR_FIELDS
    if unsupported:
        raise ValueError(f"{name}: unsupported LoKr tensors {sorted(unsupported)} (Tucker/DoRA/other algorithms)")
    w1, rank1 = _full_shape(name, shapes, "w1")
    w2, rank2 = _full_shape(name, shapes, "w2")
    for which, shape in (("w1", w1), ("w2", w2)):
        if min(shape) < 1:
            raise ValueError(f"{name}: {which} has an empty shape {shape}")
        if math.prod(shape) > MAX_FACTOR_ELEMENTS:
            raise ValueError(f"{name}: {which} {shape} is larger than any attention layer's factor")
    if layer_shape is not None and (w1[0] * w2[0], w1[1] * w2[1]) != tuple(layer_shape):
        raise ValueError(
            f"{name}: w1 {w1} ⊗ w2 {w2} gives {w1[0] * w2[0]}x{w1[1] * w2[1]}, the layer is "
            f"{layer_shape[0]}x{layer_shape[1]}"
        )
    rank = rank2 if rank2 is not None else rank1
    scale = alpha / rank if (rank is not None and alpha is not None) else 1.0
    return w1, w2, scale


def scalar_alpha(name: str, value: np.ndarray | torch.Tensor) -> float:
    """A module's ``alpha`` tensor (numpy or torch) as a float; ValueError unless it is one finite number."""
    shape = tuple(value.shape)
    if math.prod(shape) != 1 or len(shape) > 1:
        raise ValueError(f"{name}.alpha must be a single number, got shape {shape}")
    number = float(value.reshape(()))
    if not math.isfinite(number):
        raise ValueError(f"{name}.alpha must be finite, got {number}")
    return number
