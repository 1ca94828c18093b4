"""Injecting, merging, counting and validating adapters on real diffusers UNets."""

import pytest
import torch
from helpers.models import build_tiny_unet, randomize_adapter, unet_inputs
from torch import nn

from shared.krona import (
    KronaConfig,
    KronaLinear,
    adapter_state_dict,
    count_adapter_parameters,
    delete_adapter,
    inject_adapter,
    krona_layers,
    load_adapter_state_dict,
    merge_adapter,
    meta_unet,
    set_active_adapters,
    set_adapter_scale,
    unmerge_adapter,
)
from shared.models import REFERENCE_UNET_CONFIGS

SDXL_UNET = REFERENCE_UNET_CONFIGS["sdxl"]
SD15_UNET = REFERENCE_UNET_CONFIGS["sd15"]


def _unet_out(unet):
    sample, t, states = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=states).sample


def test_inject_wraps_every_attention_projection(tiny_unet):
    paths = inject_adapter(tiny_unet, KronaConfig())
    # Transformer blocks: 1 down, 1 mid, 2 up (layers_per_block + 1); each has attn1 and attn2 with 4 targets.
    assert len(paths) == 4 * 2 * 4
    assert all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in paths)
    layers = krona_layers(tiny_unet)
    assert set(layers) == set(paths)
    for path, layer in layers.items():
        assert layer.krona_a["default"].shape == (64, 8)
        assert layer.krona_b["default"].shape == (layer.out_features // 64, layer.in_features // 8), path
    trainable = [n for n, p in tiny_unet.named_parameters() if "krona_" in n]
    assert len(trainable) == 2 * len(paths)


def test_fresh_adapter_leaves_unet_output_unchanged(tiny_unet):
    before = _unet_out(tiny_unet)
    inject_adapter(tiny_unet, KronaConfig())
    torch.testing.assert_close(_unet_out(tiny_unet), before, rtol=0, atol=0)


def test_merge_unmerge_agree_with_factored_forward(tiny_unet):
    base_out = _unet_out(tiny_unet)
    base_weights = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    inject_adapter(tiny_unet, KronaConfig(a1=8, a2=8, scale=0.7))
    randomize_adapter(tiny_unet, std=0.2)
    factored = _unet_out(tiny_unet)
    assert (factored - base_out).abs().max() > 1e-2  # the adapter really changes the output
    merge_adapter(tiny_unet)
    merged = _unet_out(tiny_unet)
    torch.testing.assert_close(merged, factored, rtol=1e-5, atol=1e-5)
    unmerge_adapter(tiny_unet)
    torch.testing.assert_close(_unet_out(tiny_unet), factored, rtol=1e-5, atol=1e-5)
    set_active_adapters(tiny_unet, [])
    torch.testing.assert_close(_unet_out(tiny_unet), base_out, rtol=1e-5, atol=1e-5)
    # Unmerged weights are back to the originals, bit for bit.
    for path, layer in krona_layers(tiny_unet).items():
        assert torch.equal(layer.base_layer.weight, base_weights[path + ".weight"]), path


def test_merge_refuses_non_finite_and_leaves_weights_untouched(tiny_unet):
    inject_adapter(tiny_unet, KronaConfig(a1=8, a2=8))
    randomize_adapter(tiny_unet)
    layers = sorted(krona_layers(tiny_unet).items())
    before = [layer.base_layer.weight.clone() for _, layer in layers]
    with torch.no_grad():
        layers[-1][1].krona_b["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapter(tiny_unet)
    for (_, layer), weight in zip(layers, before, strict=True):
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)
        assert not layer.merged_adapters


def test_scale_zero_is_the_base_model(tiny_unet):
    base_out = _unet_out(tiny_unet)
    inject_adapter(tiny_unet, KronaConfig(a1=8, a2=8))
    randomize_adapter(tiny_unet, std=0.2)
    set_adapter_scale(tiny_unet, 0.0)
    torch.testing.assert_close(_unet_out(tiny_unet), base_out, rtol=0, atol=0)


def test_state_dict_round_trip_between_models(tiny_unet):
    inject_adapter(tiny_unet, KronaConfig())
    randomize_adapter(tiny_unet)
    sd = adapter_state_dict(tiny_unet)
    assert all(k.endswith((".krona_a", ".krona_b")) for k in sd)
    other = build_tiny_unet()
    loaded = load_adapter_state_dict(other, sd)
    assert len(loaded) == len(sd) // 2
    torch.testing.assert_close(_unet_out(other), _unet_out(tiny_unet), rtol=0, atol=0)
    # Loading into an existing adapter copies in place.
    inject_adapter(other, KronaConfig(), name="second")
    load_adapter_state_dict(other, sd, "second")
    torch.testing.assert_close(adapter_state_dict(other, "second"), sd)


def test_two_adapters_and_delete_restores_plain_linears(tiny_unet):
    inject_adapter(tiny_unet, KronaConfig(a1=8, a2=8), name="cat")
    inject_adapter(tiny_unet, KronaConfig(a1=64, a2=8), name="dog")
    layer = next(iter(krona_layers(tiny_unet).values()))
    assert set(layer.krona_a) == {"cat", "dog"}
    delete_adapter(tiny_unet, "cat")
    delete_adapter(tiny_unet, "dog")
    assert not krona_layers(tiny_unet)
    assert not any(isinstance(m, KronaLinear) for m in tiny_unet.modules())
    assert all(
        isinstance(tiny_unet.get_submodule(p), nn.Linear) for p, _ in tiny_unet.named_modules() if p.endswith("to_q")
    )


def test_bad_inputs_give_clear_errors(tiny_unet):
    with pytest.raises(ValueError, match=r"a1=48 does not divide d_out=64 of .*to_\w.*a1 values that divide every"):
        inject_adapter(tiny_unet, KronaConfig(a1=48))
    with pytest.raises(ValueError, match=r"a2=3 does not divide d_in=64"):
        inject_adapter(tiny_unet, KronaConfig(a1=8, a2=3))
    with pytest.raises(ValueError, match=r"target module\(s\) \['to_qq'\] match no nn.Linear.*to_q"):
        inject_adapter(tiny_unet, KronaConfig(target_modules=("to_q", "to_qq")))
    assert not krona_layers(tiny_unet)  # nothing was changed by the failed calls
    inject_adapter(tiny_unet, KronaConfig())
    with pytest.raises(ValueError, match="already exists"):
        inject_adapter(tiny_unet, KronaConfig())
    sd = adapter_state_dict(tiny_unet)
    key = next(k for k in sd if k.endswith(".krona_a"))
    wrong = dict(sd, **{key: torch.zeros(8, 8)})
    with pytest.raises(ValueError, match="update"):
        load_adapter_state_dict(tiny_unet, wrong)
    nan = dict(sd, **{key: torch.full_like(sd[key], float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        load_adapter_state_dict(tiny_unet, nan)
    with pytest.raises(ValueError, match="unexpected key"):
        load_adapter_state_dict(tiny_unet, {"foo.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match="no adapter named"):
        adapter_state_dict(tiny_unet, "missing")


def test_parameter_counts_sdxl_match_the_paper():
    assert count_adapter_parameters(SDXL_UNET, KronaConfig(a1=64, a2=4)) == 3_874_560
    assert count_adapter_parameters(SDXL_UNET, KronaConfig(a1=64, a2=8)) == 2_152_320


def test_parameter_counts_sd15():
    # 16 transformer blocks: widths 320 x5, 640 x5, 1280 x6; each block has 6 square projections and
    # 2 cross-attention k/v (768 -> d). KronA (64, 8): 512 + (d/64)(d_in/8) per layer.
    def krona(d):
        return 8 * 512 + 6 * (d // 64) * (d // 8) + 2 * (d // 64) * (768 // 8)

    expected = 5 * krona(320) + 5 * krona(640) + 6 * krona(1280)
    assert expected == 248_176
    assert count_adapter_parameters(SD15_UNET, KronaConfig()) == expected


def test_lora_rank4_count_with_peft_on_meta():
    from peft import LoraConfig, get_peft_model

    unet = meta_unet(SDXL_UNET)
    peft_model = get_peft_model(unet, LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == 5_806_080
    assert count_adapter_parameters(SDXL_UNET, KronaConfig(a1=64, a2=4)) < lora


def test_count_on_a_module_equals_real_injection(tiny_unet):
    cfg = KronaConfig(a1=16, a2=4)
    expected = count_adapter_parameters(tiny_unet, cfg)
    inject_adapter(tiny_unet, cfg)
    real = sum(p.numel() for n, p in tiny_unet.named_parameters() if "krona_" in n)
    assert real == expected


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_config_derived_shapes_match_the_real_unet(name):
    from shared.models.shapes import attention_projection_shapes

    config = REFERENCE_UNET_CONFIGS[name]
    unet = meta_unet(config)
    real = {
        p: (m.out_features, m.in_features)
        for p, m in unet.named_modules()
        if isinstance(m, nn.Linear) and p.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    }
    assert attention_projection_shapes(config) == real


def test_config_derived_shapes_match_the_tiny_models(tiny_folders):
    from shared.models import unet_config
    from shared.models.shapes import attention_projection_shapes

    for folder in tiny_folders.values():
        config = unet_config(str(folder))
        unet = meta_unet(config)
        real = {
            p: (m.out_features, m.in_features)
            for p, m in unet.named_modules()
            if isinstance(m, nn.Linear) and p.endswith(("to_q", "to_k", "to_v", "to_out.0"))
        }
        assert attention_projection_shapes(config) == real
