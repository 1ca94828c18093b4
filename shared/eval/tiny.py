"""Tiny CLIP and DINO (ViT) models built from config with seeded random weights, for tests and offline runs.

Same classes, processors and folder layout as `openai/clip-vit-large-patch14` and `facebook/dino-vits16`, with
32-pixel inputs and 32-wide layers. Built once into the tiny-model cache (`shared.models.tiny.model_cache_root`)
with `save_pretrained`, always loaded back with `from_pretrained`. Their scores mean nothing but the arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.models.tiny import SEED, model_cache_root
from shared.models.tokenizer import CLIP_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer, write_clip_tokenizer_files

BUILD_VERSION = 1
_IMAGE_SIZE = 32
_VISION = {
    "image_size": _IMAGE_SIZE,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TINY_EVAL_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-clip": {
        "text_config": {
            "vocab_size": VOCAB_SIZE,
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "bos_token_id": VOCAB_SIZE - 2,
            "eos_token_id": VOCAB_SIZE - 1,
            "pad_token_id": VOCAB_SIZE - 1,
        },
        "vision_config": {**_VISION, "num_channels": 3},
        "projection_dim": 16,
    },
    "tiny-dino": {**_VISION, "num_channels": 3, "qkv_bias": True},
}
TINY_EVAL_MODELS: tuple[str, ...] = tuple(TINY_EVAL_CONFIGS)


def tiny_eval_model_path(name: str) -> Path:
    """The cache folder of `tiny-clip` or `tiny-dino`, built or not (the name hashes config, seed and version)."""
    if name not in TINY_EVAL_CONFIGS:
        raise ValueError(f"unknown tiny evaluation model {name!r}; they are: {', '.join(TINY_EVAL_MODELS)}")
    key = {"config": TINY_EVAL_CONFIGS[name], "build_version": BUILD_VERSION, "seed": SEED}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return model_cache_root() / f"{name}-{digest}"


def _build_tiny_clip(folder: Path) -> None:
    # lazy: loads torch, transformers, PIL, …
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = TINY_EVAL_CONFIGS["tiny-clip"]
    CLIPModel(CLIPConfig(**config)).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    tokenizer = build_clip_tokenizer()
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    write_clip_tokenizer_files(folder)  # transformers 4 reads vocab.json + merges.txt


def _build_tiny_dino(folder: Path) -> None:
    # lazy: loads torch, transformers, PIL, …
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    vit = ViTModel(ViTConfig(**TINY_EVAL_CONFIGS["tiny-dino"]), add_pooling_layer=False)
    vit.eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}).save_pretrained(folder)


_BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-clip": _build_tiny_clip, "tiny-dino": _build_tiny_dino}


def ensure_tiny_eval_model(name: str) -> Path:
    """Build `tiny-clip` or `tiny-dino` into its cache folder unless it is there; return the folder.

    Built in a temporary sibling renamed into place, so the folder is either complete or absent.
    """
    # lazy: loads torch, numpy, tqdm
    import torch

    target = tiny_eval_model_path(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            _BUILDERS[name](staging)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_eval_model(name_or_path: str) -> str:
    """`tiny-clip` / `tiny-dino` → their built folder; anything else (hub id or folder) unchanged."""
    if name_or_path in TINY_EVAL_CONFIGS:
        return str(ensure_tiny_eval_model(name_or_path))
    return name_or_path
