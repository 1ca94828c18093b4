"""`krona eval` end to end: tiny-sd with an adapter, tiny CLIP and DINO folders, 2 prompts x 1 image, 2 steps."""

import json

import numpy as np
import pytest
from helpers.models import build_tiny_unet, randomize_adapter
from PIL import Image

from services.cli.main import main
from shared.eval.tiny import ensure_tiny_eval_model
from shared.krona import KronaConfig, adapter_state_dict, inject_adapter, save_adapter


@pytest.fixture
def adapter_file(tmp_path):
    unet = build_tiny_unet()
    config = KronaConfig(a1=8, a2=8)
    inject_adapter(unet, config)
    randomize_adapter(unet)
    return save_adapter(tmp_path / "a.safetensors", adapter_state_dict(unet), config, {"base_model": "tiny-sd"})


@pytest.fixture
def subject_images(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def test_eval_generates_scores_and_writes_report_and_grid(model_cache, tmp_path, adapter_file, subject_images, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# two of DreamBooth's live prompts\na {identifier} {class_noun} in the snow\na red {identifier} {class_noun}\n"
    )
    out, report_path = tmp_path / "eval", tmp_path / "report.json"
    args = [
        "eval",
        "--base", "tiny-sd",
        "--adapter", str(adapter_file),
        "--images", str(subject_images),
        "--class-noun", "dog",
        "--prompts", str(prompts),
        "--per-prompt", "1",
        "--steps", "2",
        "--seed", "3",
        "--clip", str(ensure_tiny_eval_model("tiny-clip")),
        "--dino", str(ensure_tiny_eval_model("tiny-dino")),
        "--device", "cpu",
    ]  # fmt: skip
    assert main([*args, "--out", str(out), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "CLIP-I" in printed and "a sks dog in the snow" in printed and "mean" in printed

    report = json.loads(report_path.read_text())
    assert [p["prompt"] for p in report["prompts"]] == ["a sks dog in the snow", "a red sks dog"]
    assert [p["clip_t_text"] for p in report["prompts"]] == ["a dog in the snow", "a red dog"]
    assert all(p["seeds"] == [3] for p in report["prompts"])
    for metric in ("clip_i", "clip_t", "dino"):
        per_prompt = [p[metric] for p in report["prompts"]]
        assert all(-1 <= value <= 1 for value in per_prompt)
        assert report["scores"][metric] == pytest.approx(np.mean(per_prompt))
    assert report["adapter"] == str(adapter_file) and report["base_model"] == "tiny-sd"
    with Image.open(report["grid"]) as grid:
        assert grid.size == (64, 2 * 64)  # one row per prompt, one column per image
    assert all(Image.open(p["images"][0]).size == (64, 64) for p in report["prompts"])

    # Fixed seeds: the same command scores the same.
    assert main([*args, "--out", str(tmp_path / "again"), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["scores"] == report["scores"]


def test_eval_refuses_bad_input_before_loading_anything(tmp_path, subject_images, capsys):
    common = ["eval", "--base", "tiny-sd", "--class-noun", "dog", "--out", str(tmp_path / "o")]
    assert main([*common, "--images", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*common, "--images", str(subject_images), "--per-prompt", "0"]) == 2
    assert "--per-prompt" in capsys.readouterr().err
    assert main([*common, "--images", str(subject_images), "--prompts", "nonesuch"]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_eval_adds_held_out_denoising_losses(model_cache, tmp_path, adapter_file, subject_images, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun}\n")
    class_images = tmp_path / "class"
    class_images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(class_images / "gray.png")
    report_path = tmp_path / "report.json"
    args = [
        "eval", "--base", "tiny-sd", "--adapter", str(adapter_file), "--images", str(subject_images),
        "--class-noun", "dog", "--prompts", str(prompts), "--per-prompt", "1", "--steps", "1",
        "--clip", "tiny-clip", "--dino", "tiny-dino", "--out", str(tmp_path / "eval"), "--json", str(report_path),
        "--heldout-images", str(subject_images), "--class-images", str(class_images), "--loss-samples", "2",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    assert "held-out denoising loss" in capsys.readouterr().out
    losses = json.loads(report_path.read_text())["heldout_loss"]
    assert (
        losses["subject (held out)"]["prompt"] == "a photo of sks dog" and losses["subject (held out)"]["images"] == 2
    )
    assert losses["class"]["prompt"] == "a photo of a dog" and losses["class"]["images"] == 1
    for result in losses.values():
        assert 0 < result["base"] < 10 and 0 < result["adapter"] < 10
        assert result["adapter"] != result["base"]  # the (random, non-zero) adapter changes the prediction
