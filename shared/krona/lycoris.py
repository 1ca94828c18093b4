"""Conversion to and from the kohya/LyCORIS LoKr file layout that ComfyUI, A1111 and Forge load (torch tensors).

A LoKr module in those files is ``lora_unet_<module path with '_' for '.'>`` with tensors
``.lokr_w1`` and ``.lokr_w2`` (or low-rank halves ``.lokr_w1_a/_b``, ``.lokr_w2_a/_b``) and
``.alpha``. The tools apply ΔW = kron(w1, w2) * scale, where scale = alpha / rank when a factor is
low-rank and 1 when both factors are full. DiffuseKronA's A and B are exactly full w1 and w2, so
the export is exact and the alpha value does not matter; it is still written because LyCORIS's own
loader refuses a LoKr module without it.

The conversion itself lives in ``convert.py`` (numpy, shared with the torch-free gateway); the
functions here move torch tensors in and out of it, so both sides give the same tensors, in the
file's dtype (bfloat16 included), and refuse the same files with the same messages.

LyCORIS's library loader (``lycoris.kohya.create_network_from_weights``) does not read factor
shapes from the file: it re-derives them from the layer size and a single "factor" it guesses from
the tensors, and assumes w1 is the smaller factor. It therefore rebuilds square-ish factors such
as A = 4x4 or 8x8 but not the paper's (64, 8). ``lycoris_can_rebuild`` predicts this (a port of
its ``factorization`` rule, Apache-2.0), and ``to_lycoris`` warns when it cannot.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .convert import BFLOAT16, c_order, lycoris_arrays, native_arrays_from_lycoris, unsupported_dtype_message
from .keys import lycoris_can_rebuild, lycoris_factorization

__all__ = [
    "LyCORISCompatibilityWarning",
    "from_lycoris",
    "lycoris_can_rebuild",
    "lycoris_factorization",
    "to_lycoris",
]


class LyCORISCompatibilityWarning(UserWarning):
    """The exported file is exact for ComfyUI/A1111/Forge, but LyCORIS's own loader cannot rebuild it."""


def tensor_to_numpy(key: str, tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of ``tensor`` (bfloat16 as ``convert.BFLOAT16``); ValueError for dtypes numpy lacks."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(tensor).__name__}")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(BFLOAT16)
    try:
        return tensor.numpy()
    except TypeError:  # float8 and other dtypes numpy cannot hold
        raise ValueError(unsupported_dtype_message(key, str(tensor.dtype).removeprefix("torch."))) from None


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory (``convert.BFLOAT16`` as torch.bfloat16)."""
    if array.dtype == BFLOAT16:
        return torch.from_numpy(c_order(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(c_order(array))


def to_lycoris(state_dict: Mapping[str, torch.Tensor], *, warn: bool = True) -> dict[str, torch.Tensor]:
    """Native factors -> kohya/LyCORIS LoKr tensors (full ``lokr_w1`` = A, ``lokr_w2`` = B, ``alpha``).

    CPU copies in the factors' dtype; ``alpha`` is a float32 scalar. ComfyUI, A1111 and Forge apply
    these at scale 1 for every factor shape. Warns with LyCORISCompatibilityWarning when LyCORIS's own
    loader could not rebuild some layers.
    """
    arrays, not_rebuildable = lycoris_arrays({k: tensor_to_numpy(k, v) for k, v in state_dict.items()})
    out = {key: numpy_to_tensor(array) for key, array in arrays.items()}
    if warn and not_rebuildable:
        a, b = (state_dict[not_rebuildable[0] + suffix] for suffix in (".krona_a", ".krona_b"))
        warnings.warn(
            f"{len(not_rebuildable)} of {len(out) // 3} layers use factor shapes that LyCORIS's own loader "
            f"(lycoris.kohya) cannot rebuild, e.g. {not_rebuildable[0]} (A {tuple(a.shape)}, B {tuple(b.shape)}); "
            "ComfyUI, A1111 and Forge load the file exactly. For LyCORIS-library compatibility use square-ish A, "
            "e.g. a1 = a2 = 8.",
            LyCORISCompatibilityWarning,
            stacklevel=2,
        )
    return out


def from_lycoris(
    state_dict: Mapping[str, torch.Tensor],
    module_paths: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS LoKr tensors -> native factors (``<module path>.krona_a`` / ``.krona_b``), CPU tensors.

    Accepts full or low-rank factors (``lokr_w1_a @ lokr_w1_b``), with the alpha/rank scale folded
    into B so that A ⊗ B equals what ComfyUI/A1111 apply at strength 1; A keeps w1's dtype and B w2's
    (products are computed in float32, float64 for float64 files, and rounded once). Module names may
    be diffusers-style (``lora_unet_down_blocks_0_…``) or original-SD style (``lora_unet_input_blocks_4_1_…``).
    Pass ``module_paths`` (e.g. the names of ``unet.named_modules()``) to resolve names exactly.
    Text-encoder modules, conv (Tucker) factors and DoRA scales are refused with a ValueError.
    See ``convert.native_arrays_from_lycoris``, which does the work.
    """
    arrays = {k: tensor_to_numpy(k, v) for k, v in state_dict.items()}
    native = native_arrays_from_lycoris(arrays, module_paths=module_paths)
    return {key: numpy_to_tensor(array) for key, array in native.items()}
