"""Tiny offline base models: SD-1.5- and SDXL-shaped pipelines built from config with random weights.

They let the whole service (training, inference, exports) run on a laptop with no download: the
component classes, folder layout, tokenizer and attention-module paths are those of the real models,
only the widths are small. The weights are random, so generated images are noise.

A tiny model is built once into a cache folder with `save_pretrained` and always loaded back with
`from_pretrained`, the path a real model takes, so nothing downstream can tell the difference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.models.tokenizer import (
    CLIP_MAX_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
    write_clip_tokenizer_files,
)

logger = logging.getLogger("krona.models")

# Bump when the build code changes the saved result in a way the configs below do not show.
BUILD_VERSION = 1
SEED = 0
CACHE_ENV_VAR = "KRONA_MODEL_CACHE"

# The CLIP tokenizer's special ids: the text encoders pool at the first eos_token_id, so these must match
# the tokenizer (the SD-1.5 hub config still carries CLIP's legacy 0/2, which transformers special-cases).
_CLIP_SPECIAL_IDS = {
    "bos_token_id": VOCAB_SIZE - 2,
    "eos_token_id": VOCAB_SIZE - 1,
    "pad_token_id": VOCAB_SIZE - 1,
}
_CLIP_TEXT_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    **_CLIP_SPECIAL_IDS,
}

# 4 blocks make the VAE downsample by 8, as SD's; 32/64 channels suit GroupNorm's 32 groups.
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}

# Every attention projection (to_q, to_k, to_v, to_out.0) has d_out a multiple of 64 and d_in a multiple
# of 8, so adapters with the paper's default factors a1=64, a2=8 fit every target layer.
TINY_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # SD 1.5's layout with two levels instead of four: cross-attention on the outer level and in the
    # mid block, none on the innermost level; attention_head_dim is SD 1.5's head *count* (8).
    "tiny-sd": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {
            "sample_size": 8,  # latents 8x8 → 64x64 images by default
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [64, 128],
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {**_TINY_VAE, "scaling_factor": 0.18215},
        "text_encoder": {
            "class": "CLIPTextModel",
            "config": {
                **_CLIP_TEXT_COMMON,
                "hidden_size": 64,
                "intermediate_size": 128,
                "hidden_act": "quick_gelu",
            },
            "pad_token": "<|endoftext|>",
        },
        "scheduler": {
            "class": "DDIMScheduler",
            "config": {
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "clip_sample": False,
                "set_alpha_to_one": False,
                "steps_offset": 1,
                "prediction_type": "epsilon",
            },
        },
    },
    # SDXL's layout with two levels instead of three: no attention on the outer level, two transformer
    # layers on the inner one and in the mid block; the two text encoders' penultimate states are
    # concatenated (32 + 32 = cross_attention_dim 64) and the second one's projection (32) is pooled.
    "tiny-sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [64, 128],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4],
            "cross_attention_dim": 64,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            # 6 micro-conditioning numbers x addition_time_embed_dim + text_encoder_2's projection_dim.
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 32,
        },
        "vae": {**_TINY_VAE, "scaling_factor": 0.13025},
        "text_encoder": {
            "class": "CLIPTextModel",
            "config": {
                **_CLIP_TEXT_COMMON,
                "hidden_size": 32,
                "intermediate_size": 64,
                "hidden_act": "quick_gelu",
            },
            "pad_token": "<|endoftext|>",
        },
        "text_encoder_2": {
            "class": "CLIPTextModelWithProjection",
            "config": {
                **_CLIP_TEXT_COMMON,
                "hidden_size": 32,
                "intermediate_size": 64,
                "projection_dim": 32,
                "hidden_act": "gelu",
            },
            # SDXL's second (OpenCLIP bigG) tokenizer pads with "!".
            "pad_token": "!",
        },
        "scheduler": {
            "class": "EulerDiscreteScheduler",
            "config": {
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "interpolation_type": "linear",
                "prediction_type": "epsilon",
                "steps_offset": 1,
                "timestep_spacing": "leading",
                "use_karras_sigmas": False,
            },
        },
    },
}
TINY_MODELS: tuple[str, ...] = tuple(TINY_MODEL_CONFIGS)


def model_cache_root() -> Path:
    """Where tiny models are cached: `$KRONA_MODEL_CACHE`, else `~/.cache/krona/models`."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg_cache) if xdg_cache else Path.home() / ".cache") / "krona" / "models"


def _config_or_raise(name: str) -> dict[str, Any]:
    if name not in TINY_MODEL_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; the tiny models are: {', '.join(TINY_MODELS)}")
    return TINY_MODEL_CONFIGS[name]


def tiny_model_path(name: str) -> Path:
    """The cache folder of tiny model `name`, built or not: `<cache root>/<name>-<hash>`.

    The hash covers the config, the seed and BUILD_VERSION, so changing any of them builds a fresh folder.
    Library versions are left out on purpose: a process without torch (the gateway) must find the folder
    a worker built to read its `unet/config.json`, and diffusers folders load in later releases.
    """
    key = {"config": _config_or_raise(name), "build_version": BUILD_VERSION, "seed": SEED}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return model_cache_root() / f"{name}-{digest}"


def tiny_unet_config(name: str) -> dict[str, Any]:
    """Tiny model `name`'s UNet config as `unet/config.json` would start, without torch or a build.

    Only the keys `TINY_MODEL_CONFIGS` sets, plus `_class_name`; the others take diffusers' defaults (as
    `shared.models.shapes.attention_projection_shapes` applies them).
    """
    return {"_class_name": "UNet2DConditionModel", **copy.deepcopy(_config_or_raise(name)["unet"])}


def ensure_tiny_model(name: str) -> Path:
    """Build tiny model `name` into its cache folder unless it is already there; return the folder.

    The build goes to a temporary sibling folder that is renamed into place, so the folder either does not
    exist or is complete, and two processes building at once both end up with one valid folder.
    """
    target = tiny_model_path(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
    try:
        logger.info("building %s (random weights: its images are noise) in %s", name, target)
        build_tiny_pipeline(name).save_pretrained(staging)
        for tokenizer_folder in ("tokenizer", "tokenizer_2"):
            # transformers 5 saves only tokenizer.json; vocab.json + merges.txt (as in the real SD folders)
            # keep the folder loadable by transformers 4's CLIPTokenizer too.
            if (staging / tokenizer_folder).is_dir():
                write_clip_tokenizer_files(staging / tokenizer_folder)
        # mkdtemp made the folder private (0700); the cache may be shared by the service's users.
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_pipeline(name: str) -> Any:
    """Build tiny model `name` in memory with seeded random weights (same name and torch → same weights).

    Prefer `ensure_tiny_model` / `load_pipeline`, which load it through `from_pretrained` like a real model.
    """
    try:
        # lazy: loads torch, diffusers, transformers, …
        import diffusers
        import torch
        import transformers
    except ImportError as error:
        raise RuntimeError(
            f"building {name} needs torch, diffusers and transformers ({error}); install them, or set "
            f"{CACHE_ENV_VAR} to a model cache where a worker has built {name}"
        ) from error

    config = copy.deepcopy(_config_or_raise(name))

    # fork_rng: seed each component for reproducible weights without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):

        def seeded(build: Any, *args: Any, **kwargs: Any) -> Any:
            torch.manual_seed(SEED)
            return build(*args, **kwargs)

        components: dict[str, Any] = {
            "unet": seeded(diffusers.UNet2DConditionModel, **config["unet"]),
            "vae": seeded(diffusers.AutoencoderKL, **config["vae"]),
        }
        scheduler_class = getattr(diffusers, config["scheduler"]["class"])
        components["scheduler"] = scheduler_class(**config["scheduler"]["config"])
        for key, tokenizer_key in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if key not in config:
                continue
            encoder_class = getattr(transformers, config[key]["class"])
            encoder_config = transformers.CLIPTextConfig(**config[key]["config"])
            components[key] = seeded(encoder_class, encoder_config).eval()
            components[tokenizer_key] = build_clip_tokenizer(pad_token=config[key]["pad_token"])

    pipeline_class = getattr(diffusers, config["pipeline"])
    if config["pipeline"] == "StableDiffusionPipeline":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline_class(**components)
