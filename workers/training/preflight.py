"""Checks of a training job that need the base model's shapes but not its weights."""

from __future__ import annotations

from shared.krona import count_adapter_parameters
from shared.models import resolve_base_model, unet_config
from shared.training_spec import TrainingSpec

from .lora import count_lora_parameters

__all__ = ["check_factors_fit_base_model"]


def check_factors_fit_base_model(spec: TrainingSpec, base_model: str) -> int:
    """Resolve ``base_model`` and check the factors against its UNet config (meta device, no weights).

    Returns the adapter's parameter count; raises ValueError (unknown model, a1/a2 not dividing a
    target layer, unknown target module) before any weights are loaded.
    """
    config = unet_config(resolve_base_model(base_model))
    if spec.method == "lora":
        return count_lora_parameters(config, spec)
    return count_adapter_parameters(config, spec.krona_config())
