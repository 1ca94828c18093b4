"""The adapter's arithmetic against the dense oracle x @ (W + A ⊗ B).T + b, in float64."""

import pytest
import torch
from torch import nn

from shared.krona import KronaConfig, KronaLinear, kron_delta, kron_delta_macs
from shared.krona.config import divisors


def _random_factors(d_out, d_in, a1, a2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(a1, a2, generator=g, dtype=dtype)
    b = torch.randn(d_out // a1, d_in // a2, generator=g, dtype=dtype)
    return a, b


# (d_out, d_in, a1, a2): paper factors, square, tall, wide, trivial, and both product orders.
SHAPES = [
    (320, 320, 64, 8),
    (1280, 2048, 64, 8),
    (64, 64, 8, 8),
    (48, 36, 6, 4),
    (30, 42, 1, 1),
    (30, 42, 30, 42),
    (96, 40, 2, 20),
    (40, 96, 20, 2),
]


@pytest.mark.parametrize(("d_out", "d_in", "a1", "a2"), SHAPES)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (3, 1, 4)])
def test_kron_delta_equals_dense_kron(d_out, d_in, a1, a2, lead):
    a, b = _random_factors(d_out, d_in, a1, a2)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    ours = kron_delta(x, a, b)
    oracle = x @ torch.kron(a, b).T
    assert ours.shape == (*lead, d_out)
    assert ((ours - oracle).norm() / oracle.norm()).item() < 1e-10


@pytest.mark.parametrize(("d_out", "d_in", "a1", "a2"), SHAPES)
def test_layer_output_and_gradients_match_oracle(d_out, d_in, a1, a2):
    torch.manual_seed(1)
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = KronaLinear(base)
    layer.add_adapter("default", (a1, a2), dtype=torch.float64)
    a, b = _random_factors(d_out, d_in, a1, a2, seed=2)
    with torch.no_grad():
        layer.krona_a["default"].copy_(a)
        layer.krona_b["default"].copy_(b)
    x = torch.randn(4, 9, d_in, dtype=torch.float64, requires_grad=True)
    out = layer(x)

    a_ref = a.clone().requires_grad_()
    b_ref = b.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    oracle = x_ref @ (base.weight.detach() + torch.kron(a_ref, b_ref)).T + base.bias.detach()
    assert ((out - oracle).norm() / oracle.norm()).item() < 1e-10

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    oracle.backward(grad_out)
    for ours, ref in [
        (x.grad, x_ref.grad),
        (layer.krona_a["default"].grad, a_ref.grad),
        (layer.krona_b["default"].grad, b_ref.grad),
    ]:
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-10


@pytest.mark.parametrize("keep", [True, False])
def test_gradcheck_both_product_orders(keep):
    # B first with the dense A-step (b1 <= 8), B first with batched A-step (b1 > 8), and A first.
    for a1, a2, b1, b2 in [(4, 2, 3, 5), (3, 2, 10, 6), (2, 5, 4, 2)]:
        a = torch.randn(a1, a2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(b1, b2, dtype=torch.float64, requires_grad=True)
        x = torch.randn(3, a2 * b2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, a, b: kron_delta(x, a, b, keep_intermediate=keep), (x, a, b))


def test_cheaper_order_is_chosen_and_paper_count_holds():
    # The count: (64, 8) on 1280x1280 is ~36k multiply-adds per token, B first.
    macs, order = kron_delta_macs((64, 8), (20, 160))
    assert (macs, order) == (35_840, "b_first")
    macs, order = kron_delta_macs((2, 20), (48, 2))
    assert order == "a_first" and macs == 2 * 20 * 2 + 2 * 2 * 48


def test_fresh_adapter_is_a_noop_and_init_follows_the_paper():
    torch.manual_seed(0)
    base = nn.Linear(128, 256)
    layer = KronaLinear(base)
    layer.add_adapter("default", (64, 8))
    assert torch.count_nonzero(layer.krona_b["default"]) == 0
    std = layer.krona_a["default"].std().item()
    assert 0.7 / 64 < std < 1.3 / 64
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_several_adapters_scales_and_active_set():
    torch.manual_seed(0)
    base = nn.Linear(32, 64, dtype=torch.float64)
    layer = KronaLinear(base)
    factors = {}
    for i, (name, shape) in enumerate([("one", (8, 4)), ("two", (4, 8))]):
        layer.add_adapter(name, shape, dtype=torch.float64)
        a, b = _random_factors(64, 32, *shape, seed=10 + i)
        with torch.no_grad():
            layer.krona_a[name].copy_(a)
            layer.krona_b[name].copy_(b)
        factors[name] = torch.kron(a, b)
    layer.scales["one"] = 0.5
    layer.scales["two"] = -2.0
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = base(x) + x @ (0.5 * factors["one"] - 2.0 * factors["two"]).T
    torch.testing.assert_close(layer(x), expected)
    layer.active_adapters = ["two"]
    torch.testing.assert_close(layer(x), base(x) + x @ (-2.0 * factors["two"]).T)
    layer.active_adapters = []
    torch.testing.assert_close(layer(x), base(x))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="a1 must be a positive integer"):
        KronaConfig(a1=0)
    with pytest.raises(ValueError, match="target_modules must be a non-empty"):
        KronaConfig(target_modules=())
    with pytest.raises(ValueError, match="scale must be a finite number"):
        KronaConfig(scale=float("nan"))
    with pytest.raises(ValueError, match="init_std"):
        KronaConfig(init_std=-1.0)
    with pytest.raises(ValueError, match=r"a1=48 does not divide d_out=320 of blk.to_q; use one of 1, 2, 4, 5, 8, 10"):
        KronaConfig(a1=48).factor_shapes(320, 320, "blk.to_q")
    assert divisors(320) == [1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 160, 320]
    cfg = KronaConfig(a1=16, a2=4, target_modules=["to_q"], scale=0.5)
    assert KronaConfig.from_metadata(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown adapter config fields"):
        KronaConfig.from_metadata({"a1": 4, "rank": 3})


def test_bf16_autocast_forward_and_backward_reach_float32_factors():
    torch.manual_seed(0)
    layer = KronaLinear(nn.Linear(128, 256))
    layer.add_adapter("default", (64, 8), dtype=torch.float32)
    with torch.no_grad():
        layer.krona_b["default"].normal_(0, 0.1)
    x = torch.randn(3, 10, 128)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    for factor in (layer.krona_a["default"], layer.krona_b["default"]):
        assert factor.grad is not None and factor.grad.dtype == torch.float32
        assert torch.isfinite(factor.grad).all() and factor.grad.abs().sum() > 0


def test_config_and_keys_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from shared.krona.config import KronaConfig; from shared.krona.keys import module_path_from_kohya;"
        "import shared.krona; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
