"""One LoKr codec: the torch path (training, inference, CLI) and the numpy path (the gateway) agree.

Both go through ``shared.krona.convert``; these tests hold them to it through files, bytes and the HTTP
API: the same tensors in the file's dtype (float16, bfloat16, float32, float64), low-rank factors with
alpha computed wide and rounded once, and the same refusals with the same messages.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_torch_bytes
from safetensors.torch import save as save_torch_bytes
from safetensors.torch import save_file

from shared.krona import KronaConfig, from_lycoris, kohya_name, load_adapter, to_lycoris
from shared.krona.convert import (
    BFLOAT16,
    adapter_bytes,
    lycoris_arrays,
    narrow,
    native_arrays_from_upload,
    read_safetensors_bytes,
    safetensors_bytes,
    widen,
)
from shared.krona.lycoris import numpy_to_tensor, tensor_to_numpy
from shared.krona.pipeline import read_adapter_file

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Two layers of the tiny SD UNet's shapes (d_out, d_in); the gateway checks uploads against such a table.
LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
}


def _lokr(dtype: torch.dtype, *, low_rank: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoKr state dict for LAYERS: w1 8x8, w2 full or as w2_a @ w2_b (rank 2, alpha 3) and w1 low-rank too."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, (d_out, d_in) in LAYERS.items():
        name = kohya_name(path)
        b1, b2 = d_out // 8, d_in // 8
        if low_rank:
            out[name + ".lokr_w1_a"] = torch.randn(8, 2, generator=g).to(dtype)
            out[name + ".lokr_w1_b"] = torch.randn(2, 8, generator=g).to(dtype)
            out[name + ".lokr_w2_a"] = (torch.randn(b1, 2, generator=g) * 0.1).to(dtype)
            out[name + ".lokr_w2_b"] = (torch.randn(2, b2, generator=g) * 0.1).to(dtype)
            out[name + ".alpha"] = torch.tensor(3.0, dtype=dtype)
        else:
            out[name + ".lokr_w1"] = torch.randn(8, 8, generator=g).to(dtype)
            out[name + ".lokr_w2"] = (torch.randn(b1, b2, generator=g) * 0.1).to(dtype)
            out[name + ".alpha"] = torch.tensor(1.0, dtype=dtype)
    return out


def _gateway_native(data: bytes, layer_shapes=LAYERS) -> dict[str, torch.Tensor]:
    """What the gateway stores for an uploaded file, read back as torch tensors."""
    arrays, metadata = read_safetensors_bytes(data, "upload")
    native, config, _ = native_arrays_from_upload(arrays, metadata, layer_shapes)
    return load_torch_bytes(adapter_bytes(native, config, {}))


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        # Bit for bit (NaN-free, so equal bits <=> equal values and signs of zero aside).
        assert torch.equal(got[key].view(-1), want[key].view(-1)), key


@pytest.mark.parametrize("low_rank", [False, True], ids=["full", "low-rank"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_import_keeps_the_file_dtype_and_both_paths_agree_bit_for_bit(tmp_path, dtype_name, low_rank):
    dtype = DTYPES[dtype_name]
    lokr = _lokr(dtype, low_rank=low_rank)
    save_file(lokr, tmp_path / "lokr.safetensors")
    torch_path, _ = read_adapter_file(tmp_path / "lokr.safetensors", list(LAYERS))
    gateway_path = _gateway_native((tmp_path / "lokr.safetensors").read_bytes())
    assert {t.dtype for t in torch_path.values()} == {dtype}
    _assert_identical(gateway_path, torch_path)
    _assert_identical(from_lycoris(lokr), torch_path)

    # And the values are the rule's: A = w1, B = (alpha / rank) * w2, computed wide, rounded once.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for path in LAYERS:
        name = kohya_name(path)
        f = {k.split(".", 1)[1]: v.to(wide) for k, v in lokr.items() if k.startswith(name + ".")}
        if low_rank:
            w1, w2, scale = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2_a"] @ f["lokr_w2_b"], 3.0 / 2
        else:
            w1, w2, scale = f["lokr_w1"], f["lokr_w2"], 1.0
        # One rounding of a product whose last float32 bit may differ from torch's BLAS: one ulp at most.
        ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23, torch.float64: 1e-15}[dtype]
        for got, want in ((torch_path[path + ".krona_a"], w1), (torch_path[path + ".krona_b"], w2 * scale)):
            torch.testing.assert_close(got.to(wide), want.to(dtype).to(wide), rtol=ulp, atol=ulp)
        if not low_rank:  # no arithmetic: the file's bits
            assert torch.equal(torch_path[path + ".krona_a"], lokr[name + ".lokr_w1"])
            assert torch.equal(torch_path[path + ".krona_b"], lokr[name + ".lokr_w2"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_export_keeps_the_dtype_and_both_paths_write_the_same_file(dtype_name):
    dtype = DTYPES[dtype_name]
    native = from_lycoris(_lokr(dtype, low_rank=False, seed=4))
    torch_lokr = to_lycoris(native, warn=False)
    # The gateway's download: stored native bytes -> numpy -> LoKr arrays -> bytes.
    stored, _ = read_safetensors_bytes(
        adapter_bytes({k: tensor_to_numpy(k, v) for k, v in native.items()}, KronaConfig(a1=8, a2=8), {})
    )
    gateway_lokr, not_rebuildable = lycoris_arrays(stored)
    assert not_rebuildable == [list(LAYERS)[1]]  # LyCORIS cannot rebuild 8x8 on 64x32
    _assert_identical(load_torch_bytes(safetensors_bytes(gateway_lokr)), torch_lokr)
    assert {v.dtype for k, v in torch_lokr.items() if ".lokr_w" in k} == {dtype}
    assert {v.dtype for k, v in torch_lokr.items() if k.endswith(".alpha")} == {torch.float32}
    # The export reads back to the same factors, bit for bit, on both paths.
    _assert_identical(from_lycoris(torch_lokr), native)
    _assert_identical(_gateway_native(save_torch_bytes(torch_lokr)), native)


def test_bfloat16_rounding_is_torchs():
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-30, 30, (10_000,), generator=g),
            # Exact ties (the lower 16 bits are 0x8000) with both parities, and values rounding to infinity.
            torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.39e38, -3.4028e38, 0.0, -0.0]),
            torch.tensor([float("inf"), float("-inf")]),
        ]
    )
    ours = numpy_to_tensor(narrow(values.numpy(), "bfloat16"))
    _assert_identical({"v": ours}, {"v": values.to(torch.bfloat16)})
    assert torch.isnan(numpy_to_tensor(narrow(np.array([np.nan], np.float32), "bfloat16"))).all()
    # Widening is exact: every bfloat16 is a float32.
    bf16 = values[:1000].to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(widen(tensor_to_numpy("v", bf16))), bf16.float())
    assert tensor_to_numpy("v", bf16).dtype == BFLOAT16


def test_float64_low_rank_product_is_computed_in_float64():
    lokr = _lokr(torch.float64, low_rank=True, seed=2)
    native = from_lycoris(lokr)
    name, path = kohya_name(next(iter(LAYERS))), next(iter(LAYERS))
    want = lokr[name + ".lokr_w2_a"] @ lokr[name + ".lokr_w2_b"] * 1.5
    torch.testing.assert_close(native[path + ".krona_b"], want, rtol=1e-15, atol=1e-15)


# Bad files --------------------------------------------------------------------------------------------

_PATH = next(iter(LAYERS))
_NAME = kohya_name(_PATH)


def _bad(**fields: torch.Tensor | None) -> dict[str, torch.Tensor]:
    lokr = {k: v for k, v in _lokr(torch.float32, low_rank=True).items() if k.startswith(_NAME + ".")}
    for field, value in fields.items():
        if value is None:
            lokr.pop(f"{_NAME}.{field}")
        else:
            lokr[f"{_NAME}.{field}"] = value
    return lokr


BAD_LOKR = {
    "text-encoder module": {"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.ones(2, 2)},
    "unknown module name": {
        "lora_unet_nowhere_to_q.lokr_w1": torch.ones(8, 8),
        "lora_unet_nowhere_to_q.lokr_w2": torch.ones(8, 8),
    },
    "Tucker tensor": _bad(lokr_t2=torch.ones(2, 2, 3, 3)),
    "missing w2": _bad(lokr_w2_a=None),
    "rank 0": _bad(lokr_w2_a=torch.ones(8, 0), lokr_w2_b=torch.ones(0, 8)),
    "inner sizes differ": _bad(lokr_w2_b=torch.ones(3, 8)),
    "3-D factor": _bad(lokr_w1_a=torch.ones(8, 2, 1)),
    "1-D full factor": _bad(lokr_w1_a=None, lokr_w1_b=None, lokr_w1=torch.ones(64)),
    "integer factor": _bad(lokr_w2_a=torch.ones(8, 2, dtype=torch.int32)),
    "halves of different dtypes": _bad(lokr_w2_a=torch.ones(8, 2, dtype=torch.float16)),
    "non-scalar alpha": _bad(alpha=torch.ones(2, 2)),
    "infinite alpha": _bad(alpha=torch.tensor(float("inf"))),
    "NaN in a factor": _bad(lokr_w1_a=torch.full((8, 2), float("nan"))),
    "float16 product overflows": {
        **_bad(alpha=None),
        f"{_NAME}.lokr_w2_a": torch.full((8, 2), 300.0, dtype=torch.float16),
        f"{_NAME}.lokr_w2_b": torch.full((2, 8), 300.0, dtype=torch.float16),
        f"{_NAME}.lokr_w1_a": torch.ones(8, 2, dtype=torch.float16),
        f"{_NAME}.lokr_w1_b": torch.ones(2, 8, dtype=torch.float16),
    },
    "wrong layer shape": _bad(lokr_w2_a=torch.ones(4, 2)),
    "product larger than any layer": _bad(lokr_w1_a=torch.ones(4096, 1), lokr_w1_b=torch.ones(1, 4096)),
}
BAD_NATIVE = {
    "NaN": {_PATH + ".krona_a": torch.full((8, 8), float("nan")), _PATH + ".krona_b": torch.ones(8, 8)},
    "no B": {_PATH + ".krona_a": torch.ones(8, 8)},
    "3-D A": {_PATH + ".krona_a": torch.ones(8, 8, 1), _PATH + ".krona_b": torch.ones(8, 8)},
    "integer B": {_PATH + ".krona_a": torch.ones(8, 8), _PATH + ".krona_b": torch.ones(8, 8, dtype=torch.int64)},
    "float8 A": {_PATH + ".krona_a": torch.ones(8, 8).to(torch.float8_e4m3fn), _PATH + ".krona_b": torch.ones(8, 8)},
    "foreign key": {_PATH + ".lora_down.weight": torch.ones(8, 8)},
}


def _refusal(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_LOKR))
def test_bad_lokr_files_are_refused_alike(tmp_path, case):
    file = tmp_path / "bad.safetensors"
    save_file(BAD_LOKR[case], file)
    paths = list(LAYERS)
    # Without a table of layer shapes (the CLI's `krona import`), with module names (load_into_pipeline)
    # and with the base model's shapes (the gateway).
    numpy_message = _refusal(lambda: native_arrays_from_upload(*read_safetensors_bytes(file.read_bytes()), LAYERS))
    if case == "wrong layer shape":  # only the gateway has the layers' shapes here; torch checks them on loading
        assert "gives 32x64, the layer is 64x64" in numpy_message
        return
    torch_message = _refusal(lambda: read_adapter_file(file, paths))
    assert torch_message == numpy_message
    assert _refusal(lambda: from_lycoris(BAD_LOKR[case], paths)) == torch_message


@pytest.mark.parametrize("case", sorted(BAD_NATIVE))
def test_bad_native_files_are_refused_alike(tmp_path, case):
    file = tmp_path / "bad.safetensors"
    save_file(BAD_NATIVE[case], file, metadata={"format": "krona/1", "config": KronaConfig(a1=8, a2=8).to_json()})
    torch_message = _refusal(lambda: load_adapter(file))
    numpy_message = _refusal(lambda: native_arrays_from_upload(*read_safetensors_bytes(file.read_bytes()), LAYERS))
    if case == "float8 A":  # numpy cannot even hold float8: the gateway refuses it while reading
        assert "must be a floating-point tensor" in torch_message and "could not be read" in numpy_message
        return
    assert torch_message == numpy_message


def test_bfloat16_lokr_upload_is_stored_and_served_in_bfloat16(api):
    shapes = api.context.base_model_shapes()
    a1, a2 = api.context.settings.engine_a_shape  # the one shape the deployment serves
    g = torch.Generator().manual_seed(1)
    lokr = {}
    for path, (d_out, d_in) in sorted(shapes.items())[:4]:
        name = kohya_name(path)
        lokr[name + ".lokr_w1"] = torch.randn(a1, a2, generator=g).to(torch.bfloat16)
        rank = min(2, d_out // a1, d_in // a2)  # low-rank B, at most as wide as B itself
        lokr[name + ".lokr_w2_a"] = torch.randn(d_out // a1, rank, generator=g).to(torch.bfloat16)
        lokr[name + ".lokr_w2_b"] = torch.randn(rank, d_in // a2, generator=g).to(torch.bfloat16)
        lokr[name + ".alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    response = api.client.post(
        "/v1/adapters",
        headers=api.headers(),
        files={"file": ("b.safetensors", save_torch_bytes(lokr), "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]
    stored = api.client.get(f"/v1/adapters/{adapter_id}/file", headers=api.headers())
    _assert_identical(load_torch_bytes(stored.content), from_lycoris(lokr))
    exported = api.client.get(f"/v1/adapters/{adapter_id}/file", headers=api.headers(), params={"format": "lycoris"})
    _assert_identical(load_torch_bytes(exported.content), to_lycoris(from_lycoris(lokr), warn=False))
