"""`krona train --method lora`: PEFT LoRA on KronA's targets, trained by the same loop, as the baseline to compare."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from services.cli.main import main as krona
from workers.training import TrainingSpec, check_factors_fit_base_model, load_components, load_subject_images, train


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        rng = np.random.default_rng(index)
        image = np.zeros((64, 64, 3), dtype=np.uint8)
        image[:] = rng.integers(0, 255, 3)
        image[8:40, 8:40] = rng.integers(0, 255, 3)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        (folder / f"{index}.png").write_bytes(buffer.getvalue())
    return folder


def test_lora_rank_4_trains_on_the_krona_targets_and_counts_as_peft_does(tiny_folders, image_dir, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    args = ["train", "--base", "tiny-sd", "--images", str(image_dir), "--prompt", "a photo of sks toy", "--out"]
    assert krona([*args, str(out), "--method", "lora", "--rank", "4", "--steps", "2", "--grad-accum", "1"]) == 0
    printed = capsys.readouterr().out
    tensors = load_file(out)
    with safe_open(out, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["created_by"] == "krona train" and json.loads(metadata["training"])["method"] == "lora"
    # The same layers KronA adapts (every to_q/to_k/to_v/to_out.0 of the UNet), rank 4, B no longer zero.
    components = load_components(str(tiny_folders["tiny-sd"]), device="cpu")
    targets = {
        path: module
        for path, module in components.unet.named_modules()
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    }
    downs = {k for k in tensors if k.endswith("lora.down.weight") or k.endswith("lora_A.weight")}
    assert len(downs) == len(targets) and len(tensors) == 2 * len(targets)
    assert all(tensors[k].shape[0] == 4 for k in downs)
    ups = [v for k, v in tensors.items() if k not in downs]
    assert any(torch.count_nonzero(up) > 0 for up in ups)
    count = sum(v.numel() for v in tensors.values())
    assert count == sum(4 * (m.in_features + m.out_features) for m in targets.values())
    spec = TrainingSpec(instance_prompt="x", method="lora", lora_rank=4)
    assert check_factors_fit_base_model(spec, "tiny-sd") == count
    assert f"LoRA rank 4: {count:,} trainable parameters" in printed

    # krona eval reads the LoRA file (diffusers' format) like a KronA one.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun}\n")
    report = tmp_path / "eval.json"
    assert krona([
        "eval", "--base", "tiny-sd", "--adapter", str(out), "--images", str(image_dir), "--class-noun", "toy",
        "--prompts", str(prompts), "--per-prompt", "1", "--steps", "1", "--clip", "tiny-clip", "--dino", "tiny-dino",
        "--out", str(tmp_path / "eval"), "--json", str(report), "--device", "cpu",
        "--heldout-images", str(image_dir), "--loss-samples", "2",
    ]) == 0  # fmt: skip
    evaluated = json.loads(report.read_text())
    assert evaluated["adapter"] == str(out)
    heldout = evaluated["heldout_loss"]["subject (held out)"]
    assert heldout["adapter"] != heldout["base"]  # the LoRA is applied (and off for the base loss)


def test_lora_resumes_exactly_from_a_checkpoint(tiny_folders, image_dir, tmp_path):
    images = load_subject_images(image_dir)
    base = str(tiny_folders["tiny-sd"])

    def run(steps, out, **kwargs):
        spec = TrainingSpec(
            instance_prompt="a photo of sks toy", steps=steps, gradient_accumulation=1, checkpoint_every=2,
            method="lora", lora_rank=2, learning_rate=1e-2,
        )  # fmt: skip
        return train(spec, load_components(base, device="cpu"), images, out, **kwargs)

    whole = run(4, tmp_path / "whole.safetensors")
    run(2, tmp_path / "half.safetensors", checkpoint_dir=tmp_path / "ckpt")
    resumed = run(4, tmp_path / "resumed.safetensors", checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.resumed_from_step == 2 and resumed.losses == whole.losses
    first, second = load_file(whole.adapter_path), load_file(resumed.adapter_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
