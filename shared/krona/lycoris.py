"""Conversion to and from the kohya/LyCORIS LoKr file layout that ComfyUI, A1111 and Forge load.

A LoKr module in those files is ``lora_unet_<module path with '_' for '.'>`` with tensors
``.lokr_w1`` and ``.lokr_w2`` (or low-rank halves ``.lokr_w1_a/_b``, ``.lokr_w2_a/_b``) and
``.alpha``. The tools apply ΔW = kron(w1, w2) * scale, where scale = alpha / rank when a factor is
low-rank and 1 when both factors are full. DiffuseKronA's A and B are exactly full w1 and w2, so
the export is exact and the alpha value does not matter; it is still written because LyCORIS's own
loader refuses a LoKr module without it.

LyCORIS's library loader (``lycoris.kohya.create_network_from_weights``) does not read factor
shapes from the file: it re-derives them from the layer size and a single "factor" it guesses from
the tensors, and assumes w1 is the smaller factor. It therefore rebuilds square-ish factors such
as A = 4x4 or 8x8 but not the paper's (64, 8). ``lycoris_can_rebuild`` predicts this (a port of
its ``factorization`` rule, Apache-2.0), and ``to_lycoris`` warns when it cannot.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

from .keys import (
    KRONA_A_SUFFIX,
    KRONA_B_SUFFIX,
    UNET_PREFIX,
    kohya_name,
    lycoris_can_rebuild,
    lycoris_factorization,
    module_path_from_kohya,
    plan_lokr_module,
    scalar_alpha,
)
from .model import group_factors

__all__ = [
    "LyCORISCompatibilityWarning",
    "from_lycoris",
    "lycoris_can_rebuild",
    "lycoris_factorization",
    "to_lycoris",
]


class LyCORISCompatibilityWarning(UserWarning):
    """The exported file is exact for ComfyUI/A1111/Forge, but LyCORIS's own loader cannot rebuild it."""


def to_lycoris(state_dict: Mapping[str, torch.Tensor], *, warn: bool = True) -> dict[str, torch.Tensor]:
    """Native factors -> kohya/LyCORIS LoKr tensors (full ``lokr_w1`` = A, ``lokr_w2`` = B, ``alpha``).

    ComfyUI, A1111 and Forge apply these at scale 1 for every factor shape. Warns with
    LyCORISCompatibilityWarning when LyCORIS's own loader could not rebuild some layers.
    """
    out: dict[str, torch.Tensor] = {}
    not_rebuildable: list[str] = []
    for path, (a, b) in sorted(group_factors(state_dict).items()):
        name = kohya_name(path)
        out[name + ".lokr_w1"] = a.detach().clone().contiguous()
        out[name + ".lokr_w2"] = b.detach().clone().contiguous()
        # With both factors full every loader applies scale 1 whatever alpha says.
        out[name + ".alpha"] = torch.tensor(1.0, dtype=torch.float32)
        if not lycoris_can_rebuild(tuple(a.shape), tuple(b.shape)):
            not_rebuildable.append(f"{path} (A {tuple(a.shape)}, B {tuple(b.shape)})")
    if warn and not_rebuildable:
        warnings.warn(
            f"{len(not_rebuildable)} of {len(out) // 3} layers use factor shapes that LyCORIS's own loader "
            f"(lycoris.kohya) cannot rebuild, e.g. {not_rebuildable[0]}; ComfyUI, A1111 and Forge load "
            "the file exactly. For LyCORIS-library compatibility use square-ish A, e.g. a1 = a2 = 8.",
            LyCORISCompatibilityWarning,
            stacklevel=2,
        )
    return out


def from_lycoris(
    state_dict: Mapping[str, torch.Tensor],
    module_paths: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS LoKr tensors -> native factors (``<module path>.krona_a`` / ``.krona_b``).

    Accepts full or low-rank factors (``lokr_w1_a @ lokr_w1_b``), with the alpha/rank scale folded
    into B so that A ⊗ B equals what ComfyUI/A1111 apply at strength 1. Module names may be
    diffusers-style (``lora_unet_down_blocks_0_…``) or original-SD style (``lora_unet_input_blocks_4_1_…``).
    Pass ``module_paths`` (e.g. the names of ``unet.named_modules()``) to resolve names exactly.
    Text-encoder modules, conv (Tucker) factors and DoRA scales are refused with a ValueError.
    """
    known = None if module_paths is None else {p.replace(".", "_"): p for p in module_paths}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, field = key.partition(".")
        if not field:
            raise ValueError(f"unexpected key {key!r} in a LoKr file")
        modules.setdefault(name, {})[field] = tensor
    plans = {}
    for name, fields in sorted(modules.items()):
        if not name.startswith(UNET_PREFIX):
            raise ValueError(
                f"{name}: only UNet modules ({UNET_PREFIX}…) are supported, not text-encoder or other modules"
            )
        path = module_path_from_kohya(name, known)
        alpha = scalar_alpha(name, fields["alpha"]) if "alpha" in fields else None
        # Shapes are checked before anything is multiplied (a crafted low-rank pair could be huge).
        plans[name] = (path, plan_lokr_module(name, {f: tuple(t.shape) for f, t in fields.items()}, alpha))
    out: dict[str, torch.Tensor] = {}
    for name, (path, (_, _, scale)) in plans.items():
        fields = modules[name]
        w1 = (
            fields["lokr_w1"].float()
            if "lokr_w1" in fields
            else fields["lokr_w1_a"].float() @ fields["lokr_w1_b"].float()
        )
        w2 = (
            fields["lokr_w2"].float()
            if "lokr_w2" in fields
            else fields["lokr_w2_a"].float() @ fields["lokr_w2_b"].float()
        )
        dtype = fields.get("lokr_w1", fields.get("lokr_w1_a")).dtype
        out[path + KRONA_A_SUFFIX] = w1.to(dtype)
        out[path + KRONA_B_SUFFIX] = (w2 * scale).to(dtype)
    group_factors(out)  # same checks as a native file: pairs, 2-D, finite
    return out
