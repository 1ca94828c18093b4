"""Base models: the real CLIP tokenizer, tiny offline pipelines, and loading by name, folder or Hub id.

Importing this package is cheap: torch, diffusers and transformers are imported inside the functions
that need them.
"""

from shared.models.hub import RECOMMENDED_HUB_IDS, REMOVED_HUB_IDS, BaseModelNotFound
from shared.models.reference import REFERENCE_UNET_CONFIGS
from shared.models.registry import BUILTIN_MODELS, is_sdxl, load_pipeline, resolve_base_model, unet_config
from shared.models.tiny import (
    TINY_MODEL_CONFIGS,
    build_tiny_pipeline,
    ensure_tiny_model,
    model_cache_root,
    tiny_model_path,
)
from shared.models.tokenizer import build_clip_tokenizer, write_clip_tokenizer_files

__all__ = [
    "BUILTIN_MODELS",
    "RECOMMENDED_HUB_IDS",
    "REFERENCE_UNET_CONFIGS",
    "REMOVED_HUB_IDS",
    "TINY_MODEL_CONFIGS",
    "BaseModelNotFound",
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "ensure_tiny_model",
    "is_sdxl",
    "load_pipeline",
    "model_cache_root",
    "resolve_base_model",
    "tiny_model_path",
    "unet_config",
    "write_clip_tokenizer_files",
]
