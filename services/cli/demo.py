"""`krona demo --local`: the adapter's whole life on a tiny offline model, in about half a minute on a CPU.

Builds (once) the tiny SD-1.5-shaped pipeline, trains a KronA adapter with the paper's factors for a few
steps on one synthetic image with the DreamBooth trainer that `krona train` and the workers run
(`workers.training.train`), exports it as a LyCORIS LoKr file too, loads it into a fresh pipeline with
`load_into_pipeline`, checks merge == factored, and writes images with and without it. The tiny model has
random weights, so its images are noise: the demo shows the mechanics, not art.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from shared.images import SubjectImage, save_image
from shared.krona import (
    LyCORISCompatibilityWarning,
    count_adapter_parameters,
    load_adapter,
    load_into_pipeline,
    merge_adapter,
    to_lycoris,
    unmerge_adapter,
)
from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline, resolve_base_model
from shared.training_spec import TrainingSpec
from workers.training import check_factors_fit_base_model, load_components, native_resolution, train

PROMPT = "a photo of sks square"
STEPS = 30


def _synthetic_subject(size: int) -> SubjectImage:
    """A red square on a blue background, (size, size, 3) uint8: the subject the adapter learns."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 2] = 204
    lo, hi = size // 4, 3 * size // 4
    pixels[lo:hi, lo:hi] = (242, 25, 25)
    return SubjectImage(name="square.png", pixels=pixels)


def _generate(pipe, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=4, generator=g, output_type="np").images[0]


def _quiet_libraries() -> None:
    """The demo prints its own steps; the libraries' progress bars and notices would drown them."""
    # lazy: loads torch, diffusers, transformers, …
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_demo(out: Path, base: str) -> None:
    _quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_base_model(base)
    print(f"[1/6] base model {base!r} at {folder}")
    if base.startswith("tiny-"):
        print("      (random weights built offline: images are noise; the mechanics are real)")
    # The name given, not the cache folder, goes into the adapter's metadata.
    components = dataclasses.replace(load_components(folder, device="cpu"), base_model=base)
    save_image(_generate(components.pipe, seed=0), out / "base.png")

    # A few steps at a learning rate a random tiny UNet responds to (the paper's 1e-3 is for 500 real steps).
    spec = TrainingSpec(instance_prompt=PROMPT, steps=STEPS, gradient_accumulation=1, learning_rate=1e-2, a1=64, a2=8)
    n_params = check_factors_fit_base_model(spec, folder)
    targets = ", ".join(spec.target_modules)
    print(f"[2/6] KronA a1=64 a2=8 on every {targets} of the UNet: {n_params:,} trainable parameters")
    for name in ("sd15", "sdxl"):
        full = count_adapter_parameters(REFERENCE_UNET_CONFIGS[name], spec.krona_config())
        print(f"      the same adapter on the real {name} UNet: {full:,} parameters")

    subject = _synthetic_subject(native_resolution(components))
    result = train(spec, components, [subject], out / "adapter.safetensors")
    losses = result.losses
    print(
        f"[3/6] trained {result.steps} steps with the DreamBooth trainer (workers.training): "
        f"loss {np.mean(losses[:5]):.4f} (first 5) -> {np.mean(losses[-5:]):.4f} (last 5)"
    )

    native = result.adapter_path
    state, _, _ = load_adapter(native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LyCORISCompatibilityWarning)
        lyco = to_lycoris(state)

    save_file(lyco, out / "adapter_lycoris.safetensors")
    print(f"[4/6] saved {native} and {out / 'adapter_lycoris.safetensors'} (LoKr keys for ComfyUI/A1111/Forge)")
    if caught:
        print("      note: the LyCORIS Python library cannot rebuild (64, 8) factors; ComfyUI/A1111/Forge load them")

    fresh = load_pipeline(folder)
    fresh.set_progress_bar_config(disable=True)
    loaded = load_into_pipeline(fresh, native, scale=1.0)
    adapted = _generate(fresh, seed=0)
    save_image(adapted, out / "adapted.png")
    base_img = np.asarray(Image.open(out / "base.png"), dtype=np.float32) / 255
    change = float(np.abs(adapted - base_img).mean())
    print(f"[5/6] loaded {len(loaded)} layers into a fresh pipeline; mean |adapted - base| = {change:.4f}")

    merge_adapter(fresh.unet)
    merged = _generate(fresh, seed=0)
    unmerge_adapter(fresh.unet)
    diff = float(np.abs(merged - adapted).max())
    if diff > 1e-3:
        raise RuntimeError(f"merged and factored images differ by {diff}")
    print(f"[6/6] merged == factored (max pixel difference {diff:.1e}); unmerged again")
    print(f"files in {out}: base.png, adapted.png, adapter.safetensors, adapter_lycoris.safetensors")
