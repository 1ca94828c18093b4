"""DiffuseKronA adapters: ΔW = A ⊗ B on a model's linear layers, computed without building A ⊗ B.

Only torch (and safetensors) are needed here; diffusers is imported lazily by the thin helpers
``count_adapter_parameters`` (for UNet configs) and ``load_into_pipeline``.
"""

from .config import DEFAULT_TARGET_MODULES, KronaConfig, divisors
from .counting import count_adapter_parameters, meta_unet, target_layer_shapes
from .functional import kron_delta, kron_delta_macs
from .io import FORMAT, load_adapter, save_adapter, validate_state_dict
from .layer import KronaLinear
from .lycoris import LyCORISCompatibilityWarning, from_lycoris, kohya_name, lycoris_can_rebuild, to_lycoris
from .model import (
    adapter_state_dict,
    delete_adapter,
    inject_adapter,
    krona_layers,
    load_adapter_state_dict,
    merge_adapter,
    set_active_adapters,
    set_adapter_scale,
    unmerge_adapter,
)
from .pipeline import load_into_pipeline, read_adapter_file

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
    "target_layer_shapes",
    "to_lycoris",
    "unmerge_adapter",
    "validate_state_dict",
]
