"""LoRA on the same target layers, trained by the same loop: the baseline DiffuseKronA compares itself with.

PEFT LoRA injected through diffusers (`unet.add_adapter`, as diffusers' train_dreambooth_lora.py does), rank
``spec.lora_rank`` with alpha = rank (update scale 1, like KronA's), A Kaiming-uniform and B = 0 (a no-op at
start, like KronA's B = 0), seeded by ``spec.seed``. The file is diffusers' LoRA format (``save_lora_weights``),
which ``pipe.load_lora_weights`` and ``krona eval`` load; the service's inference path serves KronA files only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.krona import KronaConfig, target_layer_shapes
from shared.krona.counting import meta_unet
from shared.training_spec import TrainingSpec

from .components import Components

__all__ = ["LORA_ADAPTER_NAME", "build_lora_adapter", "count_lora_parameters", "lora_state_dict", "save_lora_adapter"]

LORA_ADAPTER_NAME = "default"


def _lora_config(spec: TrainingSpec) -> Any:
    # lazy: loads torch, transformers, peft, …
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_rank,
        init_lora_weights=True,
        target_modules=list(spec.target_modules),
    )


def build_lora_adapter(components: Components, spec: TrainingSpec) -> list[torch.nn.Parameter]:
    """Add LoRA (float32, seeded by spec.seed) to the frozen UNet's target layers; return its parameters."""
    unet = components.unet
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet.add_adapter(_lora_config(spec), adapter_name=LORA_ADAPTER_NAME)
    params = []
    for name, param in sorted(unet.named_parameters()):
        if "lora_" in name:
            # The factors train in float32 whatever the frozen weights' dtype (as KronA's do).
            param.data = param.data.to(components.device, torch.float32)
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise ValueError(f"no LoRA layers: none of {', '.join(spec.target_modules)} is a linear layer of the UNet")
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


def lora_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """The LoRA weights in PEFT's naming (``<module path>.lora_A.weight`` …), on the CPU."""
    # lazy: loads torch, transformers, peft, …
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(components.unet, adapter_name=LORA_ADAPTER_NAME)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def load_lora_state_dict(components: Components, state: dict[str, torch.Tensor]) -> None:
    """Put saved LoRA weights (``lora_state_dict``'s naming) back into the UNet's LoRA layers."""
    # lazy: loads torch, transformers, peft, …
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(components.unet, state, adapter_name=LORA_ADAPTER_NAME)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if unexpected:
        raise ValueError(f"saved LoRA weights do not fit this UNet: {', '.join(unexpected[:3])} …")


def save_lora_adapter(path: str | os.PathLike, components: Components, metadata: dict[str, str]) -> Path:
    """The trained LoRA as one diffusers LoRA safetensors file (``pipe.load_lora_weights`` reads it), with
    ``metadata`` (base model, training parameters) added to diffusers' own."""
    # lazy: loads torch, diffusers, PIL, …
    from diffusers.utils import convert_state_dict_to_diffusers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(lora_state_dict(components))
    # save_lora_weights writes into a folder; a temporary sibling keeps the final file atomic.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        written = Path(staging) / "lora.safetensors"
        type(components.pipe).save_lora_weights(staging, unet_lora_layers=layers, weight_name=written.name)
        with safe_open(written, framework="pt") as handle:
            merged = {**(handle.metadata() or {}), **metadata}
        save_file(load_file(written), written, metadata=merged)
        os.replace(written, path)
    return path


def count_lora_parameters(unet_config: dict[str, Any], spec: TrainingSpec) -> int:
    """Trainable parameters of rank-r LoRA on the target layers: Σ r * (d_in + d_out) (no weights loaded)."""

    shapes = target_layer_shapes(meta_unet(unet_config), KronaConfig(a1=1, a2=1, target_modules=spec.target_modules))
    if not shapes:
        raise ValueError(f"none of {', '.join(spec.target_modules)} is a linear layer of the UNet")
    return sum(spec.lora_rank * (d_in + d_out) for d_out, d_in in shapes.values())
