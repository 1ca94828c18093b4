"""Adapter files: native round trips, bad files, and the LyCORIS/kohya LoKr export and import."""

import copy
import json
import warnings

import pytest
import torch
from helpers.models import build_tiny_unet, randomize_adapter, unet_inputs
from safetensors.torch import save_file

from shared.krona import (
    FORMAT,
    KronaConfig,
    LyCORISCompatibilityWarning,
    adapter_state_dict,
    from_lycoris,
    inject_adapter,
    kohya_name,
    load_adapter,
    load_adapter_state_dict,
    lycoris_can_rebuild,
    save_adapter,
    to_lycoris,
)


def _out(unet):
    sample, t, states = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=states).sample


def _trained(cfg, seed=0):
    unet = build_tiny_unet()
    inject_adapter(unet, cfg)
    randomize_adapter(unet, seed=seed, std=0.1)
    return unet


def merge_by_the_lokr_rule(unet, lokr_sd, strength=1.0):
    """The LoKr merge rule, written out here: W += strength * scale * kron(w1, w2).

    scale is alpha / rank when a factor is stored low-rank (w*_a @ w*_b), else 1. This is the rule as
    read from ComfyUI's comfy/weight_adapter/lokr.py and A1111's network_lokr.py, not their code: the
    tests that use it show agreement with the rule, not with those programs.
    """
    names = {kohya_name(p): m for p, m in unet.named_modules() if p}
    groups = {}
    for key, tensor in lokr_sd.items():
        name, _, field = key.partition(".")
        groups.setdefault(name, {})[field] = tensor
    with torch.no_grad():
        for name, f in groups.items():
            dim = None
            w1 = f.get("lokr_w1")
            if w1 is None:
                dim = f["lokr_w1_b"].shape[0]
                w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f.get("lokr_w2")
            if w2 is None:
                dim = f["lokr_w2_b"].shape[0]
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            alpha = f["alpha"].item() / dim if ("alpha" in f and dim is not None) else 1.0
            weight = names[name].weight
            weight += strength * alpha * torch.kron(w1.float(), w2.float()).reshape(weight.shape)


def test_native_round_trip(tmp_path):
    cfg = KronaConfig(a1=64, a2=8, scale=0.8)
    unet = _trained(cfg)
    sd = adapter_state_dict(unet)
    path = save_adapter(tmp_path / "a.safetensors", sd, cfg, {"base_model": "tiny-sd"})
    loaded, loaded_cfg, meta = load_adapter(path)
    assert loaded_cfg == cfg
    assert meta["format"] == FORMAT and meta["base_model"] == "tiny-sd" and meta["created_by"] == "krona"
    assert json.loads(meta["config"]) == {
        "a1": 64,
        "a2": 8,
        "targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "scale": 0.8,
    }
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])
    other = build_tiny_unet()
    load_adapter_state_dict(other, loaded, scale=loaded_cfg.scale)
    torch.testing.assert_close(_out(other), _out(unet), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_files_give_clear_errors(tmp_path):
    cfg = KronaConfig()
    sd = adapter_state_dict(_trained(cfg))
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(empty)
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path / "missing.safetensors")
    key = next(iter(sd))
    nan_path = tmp_path / "nan.safetensors"
    bad = dict(sd, **{key: torch.full_like(sd[key], float("nan"))})
    save_file(bad, nan_path, metadata={"format": FORMAT, "config": cfg.to_json()})
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(nan_path)
    with pytest.raises(ValueError, match="NaN"):
        save_adapter(tmp_path / "x.safetensors", bad, cfg)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a Krona adapter"):
        load_adapter(foreign)
    lyco = tmp_path / "lyco.safetensors"
    save_file(to_lycoris(sd, warn=False), lyco)
    with pytest.raises(ValueError, match=r"LyCORIS LoKr file.*from_lycoris"):
        load_adapter(lyco)
    half = {k: v for k, v in sd.items() if k.endswith(".krona_a")}
    with pytest.raises(ValueError, match="has no krona_b"):
        save_adapter(tmp_path / "half.safetensors", half, cfg)


def test_lycoris_keys_and_alpha():
    sd = adapter_state_dict(_trained(KronaConfig(a1=8, a2=8)))
    lyco = to_lycoris(sd)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name(path) == name
    assert torch.equal(lyco[name + ".lokr_w1"], sd[path + ".krona_a"])
    assert torch.equal(lyco[name + ".lokr_w2"], sd[path + ".krona_b"])
    assert lyco[name + ".alpha"].shape == ()
    assert len(lyco) == 3 * len(sd) // 2
    # Back again: names are split without the model and with it, both exact.
    back = from_lycoris(lyco)
    assert back.keys() == sd.keys()
    unet = build_tiny_unet()
    assert from_lycoris(lyco, [p for p, _ in unet.named_modules()]).keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k])


@pytest.mark.parametrize(("a1", "a2"), [(64, 8), (8, 8), (4, 4), (16, 2), (2, 32)])
def test_lycoris_export_merged_by_the_lokr_rule_gives_our_output(a1, a2):
    cfg = KronaConfig(a1=a1, a2=a2)
    ours = _trained(cfg, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LyCORISCompatibilityWarning)
        lyco = to_lycoris(adapter_state_dict(ours))
    untouched = build_tiny_unet()
    before = _out(untouched)
    merge_by_the_lokr_rule(untouched, lyco)
    expected = _out(ours)
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(_out(untouched), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def lycoris_kohya():
    """lycoris.kohya with its default targets narrowed to the transformer blocks, restored afterwards.

    lycoris-lora 4.1.3 targets TimestepEmbedding both by class and by name, so building its network
    on any diffusers UNet fails with "duplicated lora name: lora_unet_time_embedding_linear_1" before
    the file is read. The loader itself only uses the modules the file names.
    """
    from lycoris import kohya

    cls = kohya.LycorisNetworkKohya
    saved = (list(cls.UNET_TARGET_REPLACE_MODULE), list(cls.UNET_TARGET_REPLACE_NAME))
    cls.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    yield kohya
    cls.UNET_TARGET_REPLACE_MODULE, cls.UNET_TARGET_REPLACE_NAME = saved


def _lycoris_library_merge(kohya, unet, lyco):
    network, _ = kohya.create_network_from_weights(1.0, None, None, None, unet, weights_sd=lyco)
    assert len(network.unet_loras) == len(lyco) // 3
    network.merge_to(None, unet, lyco, torch.float32, "cpu")


@pytest.mark.parametrize(("a1", "a2"), [(4, 4), (8, 8)])
def test_lycoris_library_loader_reproduces_our_output(lycoris_kohya, a1, a2):
    ours = _trained(KronaConfig(a1=a1, a2=a2), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LyCORISCompatibilityWarning)  # these shapes must not warn
        lyco = to_lycoris(adapter_state_dict(ours))
    untouched = build_tiny_unet()
    _lycoris_library_merge(lycoris_kohya, untouched, lyco)
    torch.testing.assert_close(_out(untouched), _out(ours), rtol=1e-5, atol=1e-5)


def test_export_warns_when_lycoris_library_cannot_rebuild(lycoris_kohya):
    sd = adapter_state_dict(_trained(KronaConfig(a1=64, a2=8)))
    with pytest.warns(LyCORISCompatibilityWarning, match="cannot rebuild"):
        lyco = to_lycoris(sd)
    untouched = build_tiny_unet()
    with pytest.raises(RuntimeError):  # the library rebuilds other shapes and the copy fails
        _lycoris_library_merge(lycoris_kohya, untouched, lyco)


def test_rebuild_prediction_agrees_with_the_lycoris_library():
    from lycoris.modules.lokr import LokrModule

    shapes = [
        (d_out, d_in, a1, a2)
        for d_out, d_in in [(64, 64), (128, 64), (320, 768)]
        for a1 in (1, 2, 4, 8, 16, 64)
        for a2 in (1, 4, 8, 16)
    ]
    checked = 0
    for d_out, d_in, a1, a2 in shapes:
        if d_out % a1 or d_in % a2:
            continue
        layer = torch.nn.Linear(d_in, d_out)
        a, b = torch.randn(a1, a2), torch.randn(d_out // a1, d_in // a2)
        try:
            with torch.no_grad():
                module = LokrModule.make_module_from_state_dict(
                    "lora_unet_x", layer, a, None, None, b, None, None, None, None, torch.tensor(1.0), None
                )
            rebuilt = torch.equal(module.lokr_w1, a) and torch.equal(module.lokr_w2, b)
        except RuntimeError:
            rebuilt = False
        assert lycoris_can_rebuild((a1, a2), tuple(b.shape)) == rebuilt, (d_out, d_in, a1, a2)
        checked += 1
    assert checked > 40


def test_imported_low_rank_lokr_file_gives_the_lokr_rule_output():
    """A LyCORIS file with low-rank w2 (w2_a @ w2_b) and alpha: imported factors give what the LoKr rule merges."""
    unet = build_tiny_unet()
    g = torch.Generator().manual_seed(7)
    lyco = {}
    for path, module in unet.named_modules():
        if path.endswith(("attn1.to_q", "attn2.to_v")):
            name = kohya_name(path)
            d_out, d_in = module.out_features, module.in_features
            lyco[name + ".lokr_w1"] = torch.randn(8, 8, generator=g) * 0.1
            lyco[name + ".lokr_w2_a"] = torch.randn(d_out // 8, 2, generator=g) * 0.1
            lyco[name + ".lokr_w2_b"] = torch.randn(2, d_in // 8, generator=g) * 0.1
            lyco[name + ".alpha"] = torch.tensor(4.0)
    sd = from_lycoris(lyco)
    ours = build_tiny_unet()
    load_adapter_state_dict(ours, sd)
    reference = build_tiny_unet()
    merge_by_the_lokr_rule(reference, lyco)
    torch.testing.assert_close(_out(ours), _out(reference), rtol=1e-5, atol=1e-5)


def test_import_ldm_named_keys_and_refusals():
    a, b = torch.randn(8, 8), torch.randn(40, 80)
    ldm = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1": a,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w2": b,
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0.lokr_w1": a,
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0.lokr_w2": b,
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lokr_w1": a,
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lokr_w2": b,
    }
    assert set(from_lycoris(ldm)) == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.krona_a",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.krona_b",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0.krona_a",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0.krona_b",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.krona_a",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.krona_b",
    }
    with pytest.raises(ValueError, match="only UNet modules"):
        from_lycoris({"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": a, "lora_te_x.lokr_w2": b})
    with pytest.raises(ValueError, match="unsupported LoKr tensors"):
        from_lycoris({"lora_unet_x_to_q.lokr_w1": a, "lora_unet_x_to_q.lokr_w2": b, "lora_unet_x_to_q.lokr_t2": b})
    with pytest.raises(ValueError, match="neither lokr_w1"):
        from_lycoris({"lora_unet_x_to_q.lokr_w2": b})
    with pytest.raises(ValueError, match="names no linear layer"):
        from_lycoris({"lora_unet_nope.lokr_w1": a, "lora_unet_nope.lokr_w2": b}, ["down_blocks.0"])


def test_export_does_not_alias_model_tensors():
    unet = _trained(KronaConfig(a1=8, a2=8))
    sd = adapter_state_dict(unet)
    lyco = to_lycoris(sd)
    before = copy.deepcopy(lyco)
    randomize_adapter(unet, seed=99)
    for k in lyco:
        assert torch.equal(lyco[k], before[k])
