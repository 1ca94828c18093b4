"""Tiny models for the adapter tests: built from config with fixed seeds (never downloaded)."""

from __future__ import annotations

import torch


def build_tiny_unet(seed: int = 0):
    """An SD-1.5-shaped UNet with 64/128 channels and 64-wide text states (default factors divide it)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def unet_inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    states = torch.randn(batch, 7, 64, generator=g)
    return sample, torch.tensor([10, 500][:batch]), states


def randomize_adapter(model, name: str = "default", seed: int = 0, std: float = 0.05) -> None:
    """Give every factor of adapter `name` non-zero values (a zero B would make equality tests vacuous)."""
    from shared.krona import krona_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(krona_layers(model).items()):
            for factors in (layer.krona_a, layer.krona_b):
                p = factors[name]
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
