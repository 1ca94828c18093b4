"""Merging in every dtype: sums computed wide and rounded once, and unmerge restores the weights bit for bit."""

import pytest
import torch
from helpers.models import build_tiny_unet, randomize_adapter, unet_inputs
from torch import nn

from shared.krona import KronaConfig, KronaLinear, inject_adapter, krona_layers, merge_adapter, unmerge_adapter

# Unit roundoff: rounding to nearest is off by at most this much relative to the exact value.
UNIT_ROUNDOFF = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}


def _layer(dtype: torch.dtype, seed: int = 0, names=("default",)) -> KronaLinear:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(96, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 96, generator=g))
    layer = KronaLinear(linear.to(dtype))
    for name in names:
        layer.add_adapter(name, (8, 4), scale=0.7)
        with torch.no_grad():  # non-zero factors, of the weight's magnitude
            layer.krona_a[name].copy_(torch.randn(8, 4, generator=g))
            layer.krona_b[name].copy_(torch.randn(8, 24, generator=g) * 0.3)
    return layer


def _compute_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[torch.promote_types(dtype, torch.float32)]


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=str)
def test_merged_weight_is_the_sum_rounded_once_and_unmerge_restores_it(dtype):
    layer = _layer(dtype)
    original = layer.base_layer.weight.detach().clone()
    w = original.double()
    delta = 0.7 * torch.kron(layer.krona_a["default"].double(), layer.krona_b["default"].double())
    layer.merge("default")
    merged = layer.base_layer.weight.detach()
    assert merged.dtype == dtype
    # KronaLinear.merge's bound: u |W + ΔW| (the one rounding to the weight's dtype) plus a few roundings
    # of the compute dtype (float32, float64 for float64 weights).
    bound = UNIT_ROUNDOFF[dtype] * (w + delta).abs() + 4 * _compute_roundoff(dtype) * (w.abs() + delta.abs())
    assert ((merged.double() - (w + delta)).abs() <= bound).all()
    assert layer.unmerged_weight is not None and torch.equal(layer.unmerged_weight, original)
    layer.unmerge("default")
    assert torch.equal(layer.base_layer.weight, original)
    assert layer.unmerged_weight is None  # the copy is freed with the last unmerge


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_merged_layer_output_within_the_documented_bound(dtype):
    layer = _layer(dtype, seed=1)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    w = layer.base_layer.weight.detach().double()
    delta = layer.delta_weight("default", torch.float64)
    with torch.no_grad():
        factored = layer(x).double()
        layer.merge("default")
        merged = layer(x).double()
    # KronaLinear.merge's bound on one output: 8 u Σ_j (|W| + |ΔW|)_ij |x_j|.
    bound = 8 * UNIT_ROUNDOFF[dtype] * (x.double().abs() @ (w.abs() + delta.abs()).T)
    assert (merged - factored).abs().max() > 0  # the two paths do round differently
    assert ((merged - factored).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_unet_merged_output_within_the_documented_tolerance(dtype):
    unet = build_tiny_unet().to(dtype)
    sample, t, states = unet_inputs()

    def out():
        with torch.no_grad():
            return unet(sample.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample.double()

    inject_adapter(unet, KronaConfig(a1=8, a2=8, scale=0.7))
    randomize_adapter(unet, std=0.2)
    factored = out()
    merge_adapter(unet)
    # merge_adapter's documented tolerance for a whole (tiny) UNet: 16 u of the largest output.
    assert (out() - factored).abs().max() <= 16 * UNIT_ROUNDOFF[dtype] * factored.abs().max()


def test_float64_unet_merged_equals_factored_and_unmerge_is_bit_exact():
    unet = build_tiny_unet().double()
    sample, t, states = unet_inputs()
    sample, states = sample.double(), states.double()

    def out():
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=states).sample

    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    base = out()
    inject_adapter(unet, KronaConfig(a1=8, a2=8, scale=0.7))
    randomize_adapter(unet, std=0.2)
    factored = out()
    assert (factored - base).abs().max() > 1e-2  # the adapter really changes the output
    merge_adapter(unet)
    merged = out()
    assert ((merged - factored).abs().max() / factored.abs().max()).item() < 1e-12
    unmerge_adapter(unet)
    for path, layer in krona_layers(unet).items():
        assert torch.equal(layer.base_layer.weight, base_weights[path + ".weight"]), path
    assert torch.equal(out(), factored)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_unmerging_one_of_two_adapters_gives_the_other_merged_alone(dtype):
    layer = _layer(dtype, seed=3, names=("first", "second"))
    original = layer.base_layer.weight.detach().clone()
    alone = _layer(dtype, seed=3, names=("first", "second"))
    alone.merge("second")
    layer.merge("first")
    layer.merge("second")
    layer.unmerge("first")
    assert torch.equal(layer.base_layer.weight, alone.base_layer.weight)
    assert list(layer.merged_adapters) == ["second"]
    layer.unmerge("second")
    assert torch.equal(layer.base_layer.weight, original)


def test_non_finite_merge_keeps_no_copy_and_changes_nothing():
    layer = _layer(torch.float16)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.krona_b["default"][0, 0] = 1e5  # finite in float16, but the merged weight overflows
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge("default")
    assert torch.equal(layer.base_layer.weight, original)
    assert layer.unmerged_weight is None and not layer.merged_adapters


def test_kept_weight_follows_the_module_and_stays_out_of_state_dicts():
    layer = _layer(torch.float32)
    layer.merge("default")
    assert "unmerged_weight" not in layer.state_dict()
    layer.to(torch.float64)
    assert layer.unmerged_weight.dtype == torch.float64
