"""Trainable-parameter counts, without loading weights (UNets are built on the ``meta`` device)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import KronaConfig
from .model import check_factors_fit, find_target_linears

__all__ = ["count_adapter_parameters", "meta_unet", "target_layer_shapes"]


def _read_unet_config(source: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(source)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            config: dict[str, Any] = json.loads(candidate.read_text())
            return config
    raise FileNotFoundError(f"no UNet config at {path} (looked for config.json and unet/config.json)")


def meta_unet(unet_config: Mapping[str, Any] | str | os.PathLike[str]) -> nn.Module:
    """A diffusers UNet2DConditionModel built from its config on the meta device (no memory, no weights)."""
    # lazy: loads torch, diffusers, transformers, …
    from diffusers import UNet2DConditionModel

    config = dict(unet_config) if isinstance(unet_config, Mapping) else _read_unet_config(unet_config)
    with torch.device("meta"):
        unet: nn.Module = UNet2DConditionModel.from_config(config)
        return unet


def target_layer_shapes(model: nn.Module, config: KronaConfig) -> dict[str, tuple[int, int]]:
    """Module path -> (d_out, d_in) of every layer ``config`` targets in ``model``."""
    layers = find_target_linears(model, config.target_modules)
    return {path: (m.out_features, m.in_features) for path, m in sorted(layers.items())}


def count_adapter_parameters(
    model_or_unet_config: nn.Module | Mapping[str, Any] | str | os.PathLike[str],
    config: KronaConfig,
) -> int:
    """Number of trainable parameters of a KronA adapter: Σ over target layers of a1*a2 + (d_out/a1)*(d_in/a2).

    Takes a model (any nn.Module, wrapped or not), a UNet config dict, or a path to a UNet
    config.json / a pipeline folder; configs are built on the meta device, so SDXL costs no memory.
    Raises the same divisibility errors as inject_adapter.
    """
    model = model_or_unet_config if isinstance(model_or_unet_config, nn.Module) else meta_unet(model_or_unet_config)
    layers = find_target_linears(model, config.target_modules)
    check_factors_fit(layers, config)
    a1, a2 = config.a1, config.a2
    return sum(a1 * a2 + (m.out_features // a1) * (m.in_features // a2) for m in layers.values())
