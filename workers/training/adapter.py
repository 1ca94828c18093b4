"""The factors being trained: injected into the frozen UNet at the start (``build_adapter``: A ~ N(0, 1/a1),
B = 0 on the target layers), written out at the end (``save_trained_adapter``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from shared.krona import adapter_state_dict, inject_adapter, krona_layers, save_adapter, set_keep_intermediate
from shared.training_spec import TrainingSpec

from .components import Components
from .lora import build_lora_adapter, save_lora_adapter

__all__ = ["ADAPTER_NAME", "build_adapter", "save_trained_adapter"]

ADAPTER_NAME = "default"


def build_adapter(components: Components, spec: TrainingSpec) -> list[torch.nn.Parameter]:
    """Inject the KronA factors (float32, seeded by spec.seed) and return them; nothing else trains.

    With ``spec.method == "lora"``: LoRA on the same targets instead (``lora.build_lora_adapter``).
    """
    if spec.method == "lora":
        return build_lora_adapter(components, spec)
    unet = components.unet
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(spec.seed)
    inject_adapter(unet, spec.krona_config(), ADAPTER_NAME, dtype=torch.float32, generator=generator)
    set_keep_intermediate(unet, spec.keep_intermediate)
    params = []
    for _, layer in sorted(krona_layers(unet).items()):
        for factor in (layer.krona_a[ADAPTER_NAME], layer.krona_b[ADAPTER_NAME]):
            factor.data = factor.data.to(components.device)
            factor.requires_grad_(True)
            params.append(factor)
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


def save_trained_adapter(path: str | os.PathLike, components: Components, spec: TrainingSpec, steps: int) -> Path:
    """The final adapter file (native format; diffusers' LoRA format for ``method="lora"``), with the base model
    and training parameters in its metadata."""
    metadata = {
        "base_model": components.base_model,
        "created_by": "krona train",
        "training": json.dumps({**spec.to_dict(), "steps": steps}),
    }
    if spec.method == "lora":
        return save_lora_adapter(path, components, metadata)
    factors = adapter_state_dict(components.unet, ADAPTER_NAME)
    return save_adapter(path, factors, spec.krona_config(), metadata)
