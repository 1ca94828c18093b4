"""shared.models: the offline CLIP tokenizer, the tiny pipelines, and base-model resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared import models
from shared.models import tiny

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_fresh_python(script: str) -> str:
    """Run `script` in a new interpreter (with this environment and the repo importable); return stdout."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        check=True,
    )
    return result.stdout


@pytest.fixture(scope="session")
def tiny_pipelines(tiny_folders: dict[str, Path]) -> dict[str, object]:
    return {name: models.load_pipeline(name) for name in tiny_folders}


# The tokenizer


def test_tokenizer_gives_open_clip_ids() -> None:
    tokenizer = models.build_clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    padded = tokenizer("a photo of a cat", padding="max_length", truncation=True).input_ids
    assert padded == CAT_IDS + [49407] * (77 - len(CAT_IDS))


def test_tokenizer_files_have_clip_sizes(tmp_path: Path) -> None:
    vocab_path, merges_path = models.write_clip_tokenizer_files(tmp_path / "clip")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merge_lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merge_lines[0] == "#version: 0.2"
    assert len(merge_lines) - 1 == 48894
    assert merge_lines[1] == "i n"


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_survives_save_and_load(tmp_path: Path, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    tokenizer = models.build_clip_tokenizer(pad_token=pad_token)
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "A photo of sks dog, on the Moon! 1024px"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded("a photo of a cat").input_ids == CAT_IDS
    assert reloaded.model_max_length == 77
    assert reloaded.pad_token == pad_token
    assert len(reloaded) == 49408


# The tiny pipelines


@pytest.mark.parametrize(("name", "pipeline_class", "sdxl"), [
    ("tiny-sd", "StableDiffusionPipeline", False),
    ("tiny-sdxl", "StableDiffusionXLPipeline", True),
])  # fmt: skip
def test_tiny_pipeline_generates_at_default_size(
    tiny_pipelines: dict[str, object], name: str, pipeline_class: str, sdxl: bool
) -> None:
    pipe = tiny_pipelines[name]
    assert type(pipe).__name__ == pipeline_class
    assert models.is_sdxl(pipe) is sdxl
    assert pipe.vae_scale_factor == 8
    output = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert output.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(output.images)).all()


def test_tiny_pipelines_load_with_the_real_tokenizer(tiny_pipelines: dict[str, object]) -> None:
    for pipe in tiny_pipelines.values():
        assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert pipe.tokenizer.model_max_length == 77
    assert tiny_pipelines["tiny-sdxl"].tokenizer_2.pad_token == "!"


def test_load_pipeline_applies_dtype_and_device(tiny_folders: dict[str, Path]) -> None:
    pipe = models.load_pipeline("tiny-sd", torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.device.type == "cpu"


def test_tiny_tokenizer_folders_hold_vocab_and_merges(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    # Like the real SD folders, so tokenizers that do not read tokenizer.json (transformers 4) load them.
    from transformers import CLIPTokenizer

    for folder in (tiny_folders["tiny-sd"] / "tokenizer", tiny_folders["tiny-sdxl"] / "tokenizer_2"):
        without_json = tmp_path / folder.parent.name / folder.name
        shutil.copytree(folder, without_json, ignore=shutil.ignore_patterns("tokenizer.json"))
        assert {"vocab.json", "merges.txt"} <= {path.name for path in without_json.iterdir()}
        from_json = CLIPTokenizer.from_pretrained(folder)
        from_vocab = CLIPTokenizer.from_pretrained(without_json)
        assert from_vocab("a photo of a cat", padding="max_length").input_ids == (
            from_json("a photo of a cat", padding="max_length").input_ids
        )
        assert from_vocab.pad_token == from_json.pad_token and from_vocab.model_max_length == 77


def test_tiny_cache_folder_follows_config_and_build_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = tiny.tiny_model_path("tiny-sd")
    assert before.name.startswith("tiny-sd-") and before.parent == tiny.model_cache_root()
    monkeypatch.setattr(tiny, "BUILD_VERSION", tiny.BUILD_VERSION + 1)
    assert tiny.tiny_model_path("tiny-sd") != before
    monkeypatch.undo()
    monkeypatch.setitem(tiny.TINY_MODEL_CONFIGS["tiny-sd"]["unet"], "layers_per_block", 2)
    assert tiny.tiny_model_path("tiny-sd") != before


@pytest.mark.parametrize("name", models.BUILTIN_MODELS)
def test_attention_projections_fit_default_factors(tiny_pipelines: dict[str, object], name: str) -> None:
    # The paper's default a1=64, a2=8 must divide every target layer of the tiny UNets.
    projections = {
        path: module
        for path, module in tiny_pipelines[name].unet.named_modules()
        if path.endswith(TARGETS) and isinstance(module, torch.nn.Linear)
    }
    assert any(".attn1." in path for path in projections)
    assert any(".attn2." in path for path in projections)
    assert {path.rsplit(".", 1)[-1] for path in projections} >= {"to_q", "to_k", "to_v", "0"}
    for path, linear in projections.items():
        assert linear.out_features % 64 == 0, path
        assert linear.in_features % 8 == 0, path


@pytest.mark.parametrize("name", models.BUILTIN_MODELS)
def test_tiny_build_is_deterministic(
    tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(tiny.CACHE_ENV_VAR, str(tmp_path))
    second = models.ensure_tiny_model(name)
    first = tiny_folders[name]
    assert second.name == first.name and second != first
    weight_files = sorted(path.relative_to(first) for path in first.rglob("*.safetensors"))
    assert weight_files == sorted(path.relative_to(second) for path in second.rglob("*.safetensors"))
    assert len(weight_files) == {"tiny-sd": 3, "tiny-sdxl": 4}[name]  # UNet, VAE and text encoders
    for relative in weight_files:
        expected, actual = load_file(first / relative), load_file(second / relative)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{relative}: {key}"


def test_tiny_build_leaves_callers_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    models.build_tiny_pipeline("tiny-sd")
    assert torch.equal(torch.rand(3), expected)


def test_second_resolve_reuses_the_cache(tiny_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(name: str) -> None:
        raise AssertionError(f"{name} was rebuilt although it is cached")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", no_rebuild)
    for name, folder in tiny_folders.items():
        mtime = folder.stat().st_mtime_ns
        assert Path(models.resolve_base_model(name)) == folder
        assert folder.stat().st_mtime_ns == mtime
    assert [path.name for path in folder.parent.iterdir() if path.name.startswith(".")] == []


def test_concurrent_build_keeps_the_first_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate another process that renames its build into place while this one is saving.
    monkeypatch.setenv(tiny.CACHE_ENV_VAR, str(tmp_path))
    target = tiny.tiny_model_path("tiny-sd")

    class RacingBuild:
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "model_index.json").write_text("{}")
            target.mkdir()
            (target / "model_index.json").write_text('{"winner": true}')
            (target / "unet").mkdir()

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda name: RacingBuild())
    assert models.ensure_tiny_model("tiny-sd") == target
    assert json.loads((target / "model_index.json").read_text()) == {"winner": True}
    assert [path.name for path in tmp_path.iterdir()] == [target.name]  # the losing build is gone


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiny.CACHE_ENV_VAR, str(tmp_path))

    def broken_build(name: str) -> None:
        raise RuntimeError("out of disk")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", broken_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        models.ensure_tiny_model("tiny-sd")
    assert list(tmp_path.iterdir()) == []


# Resolution and configs


def test_unet_config_reads_json_without_torch(tiny_folders: dict[str, Path]) -> None:
    # In a fresh interpreter: neither reading the config nor resolving a cached tiny model may import
    # torch, diffusers or transformers (the gateway relies on this).
    script = (
        "import json, sys\n"
        "from shared.models import unet_config, is_sdxl\n"
        f"by_path = unet_config({str(tiny_folders['tiny-sdxl'])!r})\n"
        "by_name = unet_config('tiny-sdxl')\n"
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
        "print(json.dumps({'same': by_path == by_name, 'sdxl': is_sdxl(by_name), 'heavy': heavy}))\n"
    )
    assert json.loads(_run_fresh_python(script)) == {"same": True, "sdxl": True, "heavy": []}

    config = models.unet_config(tiny_folders["tiny-sd"])
    on_disk = json.loads((tiny_folders["tiny-sd"] / "unet" / "config.json").read_text())
    assert config == on_disk
    assert config["block_out_channels"] == [64, 128] and config["cross_attention_dim"] == 64
    assert models.is_sdxl(config) is False


@pytest.mark.parametrize("garbage", ["not a model", "/nonexistent/krona/model", "./missing-folder", "tiny-sd3"])
def test_resolve_rejects_garbage_naming_the_builtins(garbage: str) -> None:
    with pytest.raises(ValueError, match="tiny-sd, tiny-sdxl"):
        models.resolve_base_model(garbage)


def test_resolve_rejects_a_folder_without_model_index_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model_index\.json.*tiny-sd, tiny-sdxl"):
        models.resolve_base_model(tmp_path)
    checkpoint = tmp_path / "org" / "model.safetensors"  # would look like a Hub id as a relative path
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        models.resolve_base_model(checkpoint)


def test_resolve_passes_folders_and_hub_ids_through(tiny_folders: dict[str, Path]) -> None:
    folder = tiny_folders["tiny-sd"]
    assert models.resolve_base_model(str(folder)) == str(folder)
    assert models.resolve_base_model(folder) == str(folder)
    hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
    assert models.resolve_base_model(hub_id) == hub_id


def test_importing_shared_models_is_cheap() -> None:
    script = "import sys, shared.models; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    assert _run_fresh_python(script).strip() == "[]"
