"""The attention projections of a diffusers UNet2DConditionModel, derived from its config alone.

Torch-free: the gateway checks a request's factor sizes against these shapes without loading (or even
importing) the model. A test checks the derivation against the modules of real UNets built on the
meta device (SD 1.5, SD 2.1, SDXL and the tiny models).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["attention_projection_shapes", "select_targets"]

_CROSS_DOWN = {"CrossAttnDownBlock2D"}
_CROSS_UP = {"CrossAttnUpBlock2D"}
_PLAIN = {"DownBlock2D", "UpBlock2D"}
_CROSS_MID = {"UNetMidBlock2DCrossAttn"}


def _per_block(value: Any, count: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * count


def _transformer_block(prefix: str, dim: int, cross_dim: int, only_cross: bool) -> dict[str, tuple[int, int]]:
    self_kv = cross_dim if only_cross else dim
    return {
        f"{prefix}.attn1.to_q": (dim, dim),
        f"{prefix}.attn1.to_k": (dim, self_kv),
        f"{prefix}.attn1.to_v": (dim, self_kv),
        f"{prefix}.attn1.to_out.0": (dim, dim),
        f"{prefix}.attn2.to_q": (dim, dim),
        f"{prefix}.attn2.to_k": (dim, cross_dim),
        f"{prefix}.attn2.to_v": (dim, cross_dim),
        f"{prefix}.attn2.to_out.0": (dim, dim),
    }


def attention_projection_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Module path -> (d_out, d_in) of every to_q/to_k/to_v/to_out.0 in the UNet ``config`` describes.

    Supports the block types of SD 1.x/2.x/SDXL UNets; raises ValueError for others.
    """
    channels = list(config["block_out_channels"])
    n = len(channels)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    unknown = sorted({*down_types, *up_types} - _CROSS_DOWN - _CROSS_UP - _PLAIN)
    if unknown or mid_type not in _CROSS_MID | {"UNetMidBlock2D"}:
        raise ValueError(f"cannot derive attention shapes for UNet blocks {unknown or [mid_type]}")
    layers = _per_block(config.get("layers_per_block", 2), n)
    transformer_layers = _per_block(config.get("transformer_layers_per_block", 1), n)
    cross = _per_block(config.get("cross_attention_dim", 1280), n)
    only_cross = _per_block(config.get("only_cross_attention", False), n)
    shapes: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(down_types):
        if block in _CROSS_DOWN:
            for j in range(layers[i]):
                for k in range(transformer_layers[i]):
                    prefix = f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}"
                    shapes.update(_transformer_block(prefix, channels[i], cross[i], only_cross[i]))
    if mid_type in _CROSS_MID:
        for k in range(transformer_layers[-1]):
            prefix = f"mid_block.attentions.0.transformer_blocks.{k}"
            shapes.update(_transformer_block(prefix, channels[-1], cross[-1], False))
    reverse_layers = list(reversed(layers))
    reverse_transformer = config.get("reverse_transformer_layers_per_block") or list(reversed(transformer_layers))
    reverse_cross = list(reversed(cross))
    reverse_only = list(reversed(only_cross))
    reverse_channels = list(reversed(channels))
    for i, block in enumerate(up_types):
        if block in _CROSS_UP:
            for j in range(reverse_layers[i] + 1):
                for k in range(_per_block(reverse_transformer, n)[i]):
                    prefix = f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}"
                    shapes.update(_transformer_block(prefix, reverse_channels[i], reverse_cross[i], reverse_only[i]))
    return shapes


def select_targets(
    shapes: Mapping[str, tuple[int, int]], target_modules: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """The subset of ``shapes`` (from attention_projection_shapes) that ``target_modules`` select (dotted suffix).

    ValueError for a target that matches none of the attention projections.
    """
    selected = {p: s for p, s in shapes.items() if any(p == t or p.endswith("." + t) for t in target_modules)}
    missing = [t for t in target_modules if not any(p == t or p.endswith("." + t) for p in shapes)]
    if missing:
        raise ValueError(
            f"target module(s) {missing} match no attention projection of the base model; "
            "use to_q, to_k, to_v, to_out.0 (optionally prefixed by attn1./attn2.)"
        )
    return selected
