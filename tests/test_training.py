"""The DreamBooth-KronA trainer on the tiny models: shapes, learning, exact resume, determinism, bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from services.cli.main import main as krona
from shared.krona import load_adapter
from workers.training import (
    ImageLimits,
    TrainingCanceled,
    TrainingSpec,
    build_adapter,
    check_factors_fit_base_model,
    decode_image,
    denoising_loss,
    load_components,
    load_subject_images,
    prepare_data,
    train,
)


def _subject_png(seed: int, size: int = 96) -> bytes:
    """A coloured square on a plain background, different per seed: a stand-in subject."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size + 16, 3), dtype=np.uint8)
    img[:] = rng.integers(0, 255, 3)
    lo = int(rng.integers(8, 24))
    img[lo : lo + size // 2, lo : lo + size // 2] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"subject-{i}.png").write_bytes(_subject_png(i))
    return folder


def _run(base, images, out, **overrides):
    spec = TrainingSpec(
        **{"instance_prompt": "a photo of sks toy", "steps": 3, "gradient_accumulation": 1, **overrides}
    )
    components = load_components(base, device="cpu", mixed_precision=spec.mixed_precision)
    return spec, components, train(spec, components, images, out)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_short_run_writes_an_adapter_with_the_factor_formula(tiny_folders, image_dir, tmp_path, name):
    images = load_subject_images(image_dir)
    _, components, result = _run(str(tiny_folders[name]), images, tmp_path / "a.safetensors", a1=64, a2=8)
    assert result.steps == 3 and len(result.losses) == 3
    state, config, meta = load_adapter(result.adapter_path)
    assert (config.a1, config.a2) == (64, 8)
    assert meta["created_by"] == "krona train" and meta["base_model"] == str(tiny_folders[name])
    targets = {
        path: module
        for path, module in components.unet.named_modules()
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    }
    assert len(state) == 2 * len(targets)
    for path, module in targets.items():
        assert state[path + ".krona_a"].shape == (64, 8)
        assert state[path + ".krona_b"].shape == (module.out_features // 64, module.in_features // 8)
        assert torch.count_nonzero(state[path + ".krona_b"]) > 0, path


def test_sixty_steps_lower_the_held_out_denoising_loss(tiny_folders, image_dir):
    images = load_subject_images(image_dir)
    # 60 steps on a random tiny UNet: lr 1e-2 (the paper's 1e-3 is for 500 steps on real weights; at 1e-3
    # the held-out loss falls ~4% in 60 steps here, at 1e-2 ~30%).
    spec = TrainingSpec(instance_prompt="a photo of sks toy", steps=60, gradient_accumulation=1, learning_rate=1e-2)
    components = load_components(str(tiny_folders["tiny-sd"]), device="cpu")
    data = prepare_data(components, images, spec)
    from workers.training import TrainState, train_step

    params = build_adapter(components, spec)
    # Held out: (image, noise, timestep) draws from a seed the training generator never uses.
    before = denoising_loss(components, data, seed=1234, samples=32)
    state = TrainState.start(spec, params)
    for _ in range(spec.steps):
        train_step(components, data, spec, state)
    after = denoising_loss(components, data, seed=1234, samples=32)
    assert after < 0.85 * before, (before, after)  # at least 15% lower


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_folders, image_dir, tmp_path):
    base = str(tiny_folders["tiny-sd"])
    images = load_subject_images(image_dir)
    kwargs = dict(
        instance_prompt="a photo of sks toy", steps=6, gradient_accumulation=2, checkpoint_every=2, random_flip=True
    )
    spec = TrainingSpec(**kwargs)
    straight = train(spec, load_components(base, device="cpu"), images, tmp_path / "straight.safetensors")

    calls = {"n": 0}

    def cancel_after_three_steps():
        calls["n"] += 1
        return calls["n"] > 3

    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingCanceled) as info:
        train(
            spec,
            load_components(base, device="cpu"),
            images,
            tmp_path / "x.safetensors",
            checkpoint_dir=ckpt,
            should_cancel=cancel_after_three_steps,
        )
    assert info.value.step == 3 and info.value.checkpoint is not None
    resumed = train(
        spec,
        load_components(base, device="cpu"),
        images,
        tmp_path / "resumed.safetensors",
        checkpoint_dir=ckpt,
        resume=True,
    )
    assert resumed.resumed_from_step == 3 and resumed.steps == 6
    a, _, _ = load_adapter(straight.adapter_path)
    b, _, _ = load_adapter(resumed.adapter_path)
    for key in a:
        assert torch.equal(b[key], a[key]), key  # bitwise on the CPU
    assert resumed.losses == straight.losses


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_folders, image_dir, tmp_path):
    base = str(tiny_folders["tiny-sd"])
    images = load_subject_images(image_dir)
    _, _, one = _run(base, images, tmp_path / "1.safetensors", seed=7)
    _, _, two = _run(base, images, tmp_path / "2.safetensors", seed=7)
    _, _, other = _run(base, images, tmp_path / "3.safetensors", seed=8)
    a, b, c = (load_adapter(r.adapter_path)[0] for r in (one, two, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_input_fails_before_training(tiny_folders, tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(b"this is text, not a picture", "notes.png")
    truncated = _subject_png(0)[:200]
    with pytest.raises(ValueError, match=r"subject\.png: the image data is damaged"):
        decode_image(truncated, "subject.png")
    small = io.BytesIO()
    Image.new("RGB", (32, 32)).save(small, format="PNG")
    with pytest.raises(ValueError, match="too small"):
        decode_image(small.getvalue(), "small.png")
    big = io.BytesIO()
    Image.new("1", (9000, 9000)).save(big, format="PNG")
    with pytest.raises(ValueError, match="over the limit of"):
        decode_image(big.getvalue(), "bomb.png", ImageLimits(max_pixels=10_000_000))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_subject_images(empty)
    spec = TrainingSpec(instance_prompt="a photo of sks toy", a1=48)
    with pytest.raises(ValueError, match="a1=48 does not divide d_out=64"):
        check_factors_fit_base_model(spec, str(tiny_folders["tiny-sd"]))
    with pytest.raises(ValueError, match="unknown base model"):
        check_factors_fit_base_model(TrainingSpec(instance_prompt="x"), "not a model")
    with pytest.raises(ValueError, match="instance_prompt must be a non-empty"):
        TrainingSpec(instance_prompt="  ")
    with pytest.raises(ValueError, match=r"steps: Input should be greater than or equal to 1 \(got 0\)"):
        TrainingSpec(instance_prompt="x", steps=0)
    with pytest.raises(ValueError, match="prior_preservation needs a class_prompt"):
        TrainingSpec(instance_prompt="x", prior_preservation=True)


def test_cli_train_and_generate(tiny_folders, image_dir, tmp_path, capsys):
    base = str(tiny_folders["tiny-sd"])
    out = tmp_path / "cli.safetensors"
    code = krona(
        [
            "train",
            "--base",
            base,
            "--images",
            str(image_dir),
            "--prompt",
            "a photo of sks toy",
            "--steps",
            "2",
            "--grad-accum",
            "1",
            "--out",
            str(out),
            "--checkpoint-every",
            "1",
            "--validation-dir",
            str(tmp_path / "val"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"wrote {out}" in printed and "validation image" in printed
    assert (tmp_path / "cli.safetensors.checkpoints").is_dir()
    code = krona(
        [
            "train",
            "--base",
            base,
            "--images",
            str(image_dir),
            "--prompt",
            "a photo of sks toy",
            "--steps",
            "3",
            "--grad-accum",
            "1",
            "--out",
            str(out),
            "--resume",
            str(tmp_path / "cli.safetensors.checkpoints"),
        ]
    )
    assert code == 0 and "resumed from step 2" in capsys.readouterr().out
    img = tmp_path / "img.png"
    assert (
        krona(
            [
                "generate",
                "--base",
                base,
                "--adapter",
                str(out),
                "--prompt",
                "a photo of sks toy",
                "--steps",
                "2",
                "--out",
                str(img),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert Image.open(img).size == (64, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("nope")
    assert (
        krona(
            ["train", "--base", base, "--images", str(bad), "--prompt", "p", "--out", str(tmp_path / "n.safetensors")]
        )
        == 2
    )
    assert "x.png: not a readable image" in capsys.readouterr().err


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (120, 80), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display": a portrait photo stored sideways
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    decoded = decode_image(buf.getvalue(), "portrait.jpg")
    assert decoded.pixels.shape == (120, 80, 3)


def test_progress_and_prior_preservation(tiny_folders, image_dir, tmp_path):
    images = load_subject_images(image_dir)
    spec = TrainingSpec(
        instance_prompt="a photo of sks toy",
        steps=2,
        gradient_accumulation=1,
        prior_preservation=True,
        class_prompt="a photo of a toy",
        num_class_images=2,
        validation_steps=2,
    )
    events = []
    result = train(
        spec,
        load_components(str(tiny_folders["tiny-sd"]), device="cpu"),
        images,
        tmp_path / "p.safetensors",
        on_progress=events.append,
    )
    assert [e.step for e in events] == [1, 2]
    assert all(e.total_steps == 2 and e.loss > 0 and e.eta_seconds >= 0 and e.learning_rate == 1e-3 for e in events)
    assert events[-1].eta_seconds == 0
    # The prior term is part of the loss: the same run without it gives other numbers.
    plain = TrainingSpec(instance_prompt="a photo of sks toy", steps=2, gradient_accumulation=1)
    other = train(
        plain, load_components(str(tiny_folders["tiny-sd"]), device="cpu"), images, tmp_path / "q.safetensors"
    )
    assert result.losses != other.losses


def test_bf16_mixed_precision_runs_on_the_cpu(tiny_folders, image_dir, tmp_path):
    # The GPU path (frozen model in bf16 under autocast, float32 factors), exercised on the CPU.
    images = load_subject_images(image_dir)
    _, components, result = _run(
        str(tiny_folders["tiny-sd"]), images, tmp_path / "bf16.safetensors", mixed_precision="bf16"
    )
    assert components.unet.dtype == torch.bfloat16 and components.vae.dtype == torch.float32
    state, _, _ = load_adapter(result.adapter_path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert all(0 < loss < 10 for loss in result.losses)
