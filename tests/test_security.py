"""Security findings of issue 14, each reproduced with the input that showed it.

The adapter-upload memory bomb, malformed LoKr files that gave 500s, and the webhook findings
(addresses, per-tenant secrets, DNS rebinding, deadlines, attempt limits) live here.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from shared.krona.convert import native_arrays_from_upload

# The finding used 8000x1 by 1x8000 float16 (a 256 MB float32 product from a 32 KB file); 4000 keeps the
# old behaviour's product at 64 MB, harmless on a 2-core CI machine yet far above the bound asserted here.
BOMB = 4000
PEAK_BUDGET = 4 * 1024 * 1024


def _bomb(name: str, n: int = BOMB) -> dict[str, np.ndarray]:
    return {
        f"{name}.lokr_w1_a": np.ones((n, 1), np.float16),
        f"{name}.lokr_w1_b": np.ones((1, n), np.float16),
        f"{name}.lokr_w2": np.ones((1, 1), np.float16),
        f"{name}.alpha": np.array(1.0, np.float32),
    }


def _peak_bytes(call) -> tuple[int, Exception | None]:
    """Peak of Python-traced memory (numpy's buffers included) while ``call`` runs."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    error = None
    try:
        call()
    except Exception as exc:  # the caller checks the kind
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, error


@pytest.fixture(scope="module")
def tiny_shapes(tiny_folders):
    from shared.models import unet_config
    from shared.models.shapes import attention_projection_shapes

    return attention_projection_shapes(unet_config(tiny_folders["tiny-sd"]))


def test_lokr_bomb_is_refused_before_any_product(tiny_shapes):
    real = next(iter(sorted(tiny_shapes)))
    cases = {
        "made-up name": (_bomb("lora_unet_made_up_to_q"), tiny_shapes),
        "real layer, wrong shape": (_bomb("lora_unet_" + real.replace(".", "_")), tiny_shapes),
        "no base model given": (_bomb("lora_unet_made_up_to_q", n=1 << 12), None),
    }
    for label, (arrays, shapes) in cases.items():
        peak, error = _peak_bytes(lambda a=arrays, s=shapes: native_arrays_from_upload(a, {}, s))
        assert isinstance(error, ValueError), (label, error)
        assert peak < PEAK_BUDGET, f"{label}: peak {peak / 2**20:.1f} MiB while refusing"
    # Without a base model the ceiling still holds: a product larger than any attention layer's factor.
    with pytest.raises(ValueError, match="larger than any attention layer"):
        native_arrays_from_upload(_bomb("lora_unet_made_up_to_q", n=1 << 12), {}, None)


def test_lokr_bomb_torch_path_is_refused():
    import torch

    from shared.krona import from_lycoris

    arrays = {k: torch.from_numpy(v) for k, v in _bomb("lora_unet_made_up_to_q", n=1 << 12).items()}
    with pytest.raises(ValueError, match="larger than any attention layer"):
        from_lycoris(arrays)
    with pytest.raises(ValueError, match="names no linear layer"):
        from_lycoris(arrays, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])


def _lokr_for(path: str, shape: tuple[int, int], **overrides: np.ndarray) -> dict[str, np.ndarray]:
    d_out, d_in = shape
    name = "lora_unet_" + path.replace(".", "_")
    arrays = {
        f"{name}.lokr_w1": np.full((8, 8), 0.01, np.float32),
        f"{name}.lokr_w2_a": np.full((d_out // 8, 2), 0.01, np.float32),
        f"{name}.lokr_w2_b": np.full((2, d_in // 8), 0.01, np.float32),
        f"{name}.alpha": np.array(1.0, np.float32),
    }
    for field, value in overrides.items():
        key = f"{name}.{field}"
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def test_malformed_lokr_is_a_value_error(tiny_shapes):
    path, shape = next(iter(sorted(tiny_shapes.items())))
    d_out, d_in = shape
    good = _lokr_for(path, shape)
    native, _, source = native_arrays_from_upload(good, {}, tiny_shapes)
    assert source == "lycoris" and native[path + ".krona_b"].shape == (d_out // 8, d_in // 8)
    bad = {
        "rank 0 with alpha": _lokr_for(
            path, shape, lokr_w2_a=np.zeros((d_out // 8, 0), np.float32), lokr_w2_b=np.zeros((0, d_in // 8), np.float32)
        ),
        "non-scalar alpha": _lokr_for(path, shape, alpha=np.ones((2, 2), np.float32)),
        "infinite alpha": _lokr_for(path, shape, alpha=np.array(np.inf, np.float32)),
        "inner sizes differ": _lokr_for(path, shape, lokr_w2_b=np.ones((3, d_in // 8), np.float32)),
        "3-D factor": _lokr_for(path, shape, lokr_w1=np.ones((8, 8, 1), np.float32)),
        "integer factor": _lokr_for(path, shape, lokr_w1=np.ones((8, 8), np.int32)),
        "missing w2": _lokr_for(path, shape, lokr_w2_a=None),
    }
    for label, arrays in bad.items():
        with pytest.raises(ValueError):
            native_arrays_from_upload(arrays, {}, tiny_shapes)
        print("refused:", label)


def test_upload_bomb_and_malformed_files_answer_422_with_flat_memory(api):
    shapes = api.context.base_model_shapes()
    path, shape = next(iter(sorted(shapes.items())))
    d_out, d_in = shape

    def upload(arrays):
        return api.client.post(
            "/v1/adapters",
            headers=api.headers(),
            files={"file": ("x.safetensors", save_safetensors(arrays), "application/octet-stream")},
        )

    upload(_lokr_for(path, shape))  # warm up the route (imports, the base model's shapes)
    peak, error = _peak_bytes(lambda: setattr(api, "last", upload(_bomb("lora_unet_made_up_to_q"))))
    assert error is None and api.last.status_code == 422, api.last.text
    assert api.last.json()["error"]["code"] == "invalid_adapter"
    assert peak < PEAK_BUDGET, f"peak {peak / 2**20:.1f} MiB while refusing a {BOMB}x1 @ 1x{BOMB} file"
    for arrays in (
        _lokr_for(
            path, shape, lokr_w2_a=np.zeros((d_out // 8, 0), np.float32), lokr_w2_b=np.zeros((0, d_in // 8), np.float32)
        ),
        _lokr_for(path, shape, alpha=np.ones((3,), np.float32)),
    ):
        response = upload(arrays)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_adapter"
