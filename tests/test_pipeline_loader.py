"""load_into_pipeline on real (tiny) diffusers pipelines loaded through from_pretrained."""

import pytest
import torch
from helpers.models import randomize_adapter
from safetensors.torch import save_file

from shared.krona import (
    KronaConfig,
    LyCORISCompatibilityWarning,
    adapter_state_dict,
    inject_adapter,
    krona_layers,
    load_into_pipeline,
    save_adapter,
    to_lycoris,
)
from shared.models import is_sdxl, load_pipeline


def _unet_out(pipe):
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if is_sdxl(pipe):
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=states, **kwargs).sample


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_native_and_lycoris_files_load_into_a_fresh_pipeline(tiny_folders, tmp_path, name):
    trained = load_pipeline(tiny_folders[name])
    cfg = KronaConfig()  # the paper's (64, 8) fits every tiny-model projection
    inject_adapter(trained.unet, cfg)
    randomize_adapter(trained.unet, std=0.1)
    expected = _unet_out(trained)
    state = adapter_state_dict(trained.unet)
    native = save_adapter(tmp_path / "a.safetensors", state, cfg, {"base_model": name})
    with pytest.warns(LyCORISCompatibilityWarning):
        lyco = to_lycoris(state)
    save_file(lyco, tmp_path / "a_lycoris.safetensors")

    fresh = load_pipeline(tiny_folders[name])
    base = _unet_out(fresh)
    assert (expected - base).abs().max() > 1e-3
    paths = load_into_pipeline(fresh, native)
    assert len(paths) == len(state) // 2
    torch.testing.assert_close(_unet_out(fresh), expected, rtol=1e-5, atol=1e-5)

    # Replacing with the LyCORIS export of the same adapter gives the same output.
    load_into_pipeline(fresh, tmp_path / "a_lycoris.safetensors")
    torch.testing.assert_close(_unet_out(fresh), expected, rtol=1e-5, atol=1e-5)
    assert all(set(layer.krona_a) == {"default"} for layer in krona_layers(fresh.unet).values())

    load_into_pipeline(fresh, native, scale=0.0)
    torch.testing.assert_close(_unet_out(fresh), base, rtol=0, atol=0)


def test_load_into_pipeline_refuses_foreign_files(tiny_folders, tmp_path):
    pipe = load_pipeline(tiny_folders["tiny-sd"])
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(ValueError, match="neither a Krona adapter"):
        load_into_pipeline(pipe, other)
    with pytest.raises(ValueError, match=r"no \.unet"):
        load_into_pipeline(object(), other)
