"""DiffuseKronA adapters: ΔW = A ⊗ B on a model's linear layers, computed without building A ⊗ B.

Names are imported lazily (PEP 562), so ``from shared.krona.config import KronaConfig`` and the key
helpers in ``shared.krona.keys`` work without torch (the gateway validates requests with them);
everything else needs torch and safetensors, and diffusers only inside ``count_adapter_parameters``
(which builds a UNet from its config on the meta device); ``load_into_pipeline`` takes the caller's pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_TARGET_MODULES": "config",
    "KronaConfig": "config",
    "divisors": "config",
    "count_adapter_parameters": "counting",
    "meta_unet": "counting",
    "target_layer_shapes": "counting",
    "kron_delta": "functional",
    "kron_delta_macs": "functional",
    "FORMAT": "io",
    "load_adapter": "io",
    "save_adapter": "io",
    "validate_state_dict": "io",
    "KronaLinear": "layer",
    "LyCORISCompatibilityWarning": "lycoris",
    "from_lycoris": "lycoris",
    "kohya_name": "keys",
    "lycoris_can_rebuild": "lycoris",
    "to_lycoris": "lycoris",
    "adapter_state_dict": "model",
    "delete_adapter": "model",
    "inject_adapter": "model",
    "krona_layers": "model",
    "load_adapter_state_dict": "model",
    "merge_adapter": "model",
    "set_active_adapters": "model",
    "set_adapter_scale": "model",
    "set_keep_intermediate": "model",
    "unmerge_adapter": "model",
    "load_into_pipeline": "pipeline",
    "read_adapter_file": "pipeline",
}

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FORMAT",
    "KronaConfig",
    "KronaLinear",
    "LyCORISCompatibilityWarning",
    "adapter_state_dict",
    "count_adapter_parameters",
    "delete_adapter",
    "divisors",
    "from_lycoris",
    "inject_adapter",
    "kohya_name",
    "kron_delta",
    "kron_delta_macs",
    "krona_layers",
    "load_adapter",
    "load_adapter_state_dict",
    "load_into_pipeline",
    "lycoris_can_rebuild",
    "merge_adapter",
    "meta_unet",
    "read_adapter_file",
    "save_adapter",
    "set_active_adapters",
    "set_adapter_scale",
    "set_keep_intermediate",
    "target_layer_shapes",
    "to_lycoris",
    "unmerge_adapter",
    "validate_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .config import DEFAULT_TARGET_MODULES, KronaConfig, divisors
    from .counting import count_adapter_parameters, meta_unet, target_layer_shapes
    from .functional import kron_delta, kron_delta_macs
    from .io import FORMAT, load_adapter, save_adapter, validate_state_dict
    from .keys import kohya_name
    from .layer import KronaLinear
    from .lycoris import LyCORISCompatibilityWarning, from_lycoris, lycoris_can_rebuild, to_lycoris
    from .model import (
        adapter_state_dict,
        delete_adapter,
        inject_adapter,
        krona_layers,
        load_adapter_state_dict,
        merge_adapter,
        set_active_adapters,
        set_adapter_scale,
        set_keep_intermediate,
        unmerge_adapter,
    )
    from .pipeline import load_into_pipeline, read_adapter_file
