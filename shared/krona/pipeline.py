"""One call to put a Krona (or LyCORIS LoKr) adapter file on a plain diffusers pipeline.

diffusers' ``load_lora_weights`` cannot load LoKr files; this is the replacement for KronA files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .io import FORMAT, load_adapter, read_safetensors
from .keys import is_lokr_key
from .lycoris import from_lycoris
from .model import delete_adapter, krona_layers, load_adapter_state_dict, set_adapter_scale

if TYPE_CHECKING:
    import torch

__all__ = ["load_into_pipeline", "read_adapter_file"]


def read_adapter_file(
    path: str | os.PathLike[str], module_paths: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Native factors and metadata of a native Krona file or a kohya/LyCORIS LoKr file (converted)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT:
        state_dict, _config, metadata = load_adapter(path)
        return state_dict, metadata
    if any(map(is_lokr_key, tensors)):
        return from_lycoris(tensors, module_paths), metadata
    raise ValueError(f"{path} is neither a Krona adapter ({FORMAT}) nor a LyCORIS LoKr file")


def load_into_pipeline(pipe: Any, path: str | os.PathLike[str], scale: float = 1.0, name: str = "default") -> list[str]:
    """Load an adapter file into ``pipe.unet`` as adapter ``name`` at ``scale``; returns the UNet paths adapted.

    Works on any diffusers pipeline with a ``unet`` (SD 1.x/2.x, SDXL). A previous adapter of the
    same name is replaced. The text encoders are not touched (DiffuseKronA adapts the UNet only).
    """
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no .unet; load_into_pipeline supports UNet pipelines")
    module_paths = [p for p, _ in unet.named_modules() if p]
    state_dict, _metadata = read_adapter_file(path, module_paths)
    if any(name in layer.krona_a for layer in krona_layers(unet).values()):
        delete_adapter(unet, name)
    weight = next(unet.parameters())
    state_dict = {k: v.to(device=weight.device, dtype=weight.dtype) for k, v in state_dict.items()}
    paths = load_adapter_state_dict(unet, state_dict, name)
    set_adapter_scale(unet, scale, name)
    return paths
