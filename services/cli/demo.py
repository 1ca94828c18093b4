"""`krona demo`: the adapter's whole life on a tiny offline model, in about half a minute on a CPU.

Builds (once) the tiny SD-1.5-shaped pipeline, injects a KronA adapter with the paper's factors,
fits it for a few steps to one synthetic image (a toy stand-in: the DreamBooth trainer is `krona
train`, issue 3), saves it natively and as a LyCORIS LoKr file, loads it into a fresh pipeline
with `load_into_pipeline`, checks merge == factored, and writes images with and without it. The
tiny model has random weights, so its images are noise: the demo shows the mechanics, not art.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.krona import (
    KronaConfig,
    LyCORISCompatibilityWarning,
    adapter_state_dict,
    count_adapter_parameters,
    inject_adapter,
    load_into_pipeline,
    merge_adapter,
    save_adapter,
    to_lycoris,
    unmerge_adapter,
)
from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline, resolve_base_model

PROMPT = "a photo of sks square"


def _synthetic_subject(size: int) -> torch.Tensor:
    """A red square on a blue background, as a (1, 3, size, size) tensor in [-1, 1]."""
    img = torch.full((3, size, size), -1.0)
    img[2] = 0.6
    lo, hi = size // 4, 3 * size // 4
    img[:, lo:hi, lo:hi] = torch.tensor([0.9, -0.8, -0.8]).view(3, 1, 1)
    return img.unsqueeze(0)


def _toy_fit(pipe, steps: int, seed: int) -> list[float]:
    """Denoising-loss steps on the synthetic image that touch only the KronA factors."""
    torch.manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(_synthetic_subject(64)).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    params = [p for n, p in pipe.unet.named_parameters() if "krona_" in n]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,))
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _generate(pipe, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=4, generator=g, output_type="np").images[0]


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _quiet_libraries() -> None:
    """The demo prints its own steps; the libraries' progress bars and notices would drown them."""
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
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    _save_png(_generate(pipe, seed=0), out / "base.png")

    config = KronaConfig(a1=64, a2=8)
    paths = inject_adapter(pipe.unet, config)
    n_params = sum(p.numel() for n, p in pipe.unet.named_parameters() if "krona_" in n)
    print(f"[2/6] injected KronA a1=64 a2=8 into {len(paths)} attention projections: {n_params:,} parameters")
    for name in ("sd15", "sdxl"):
        full = count_adapter_parameters(REFERENCE_UNET_CONFIGS[name], config)
        print(f"      the same adapter on the real {name} UNet: {full:,} parameters")

    pipe.unet.requires_grad_(False)
    for n, p in pipe.unet.named_parameters():
        p.requires_grad_("krona_" in n)
    losses = _toy_fit(pipe, steps=30, seed=0)
    print(f"[3/6] toy fit, 30 steps: loss {np.mean(losses[:5]):.4f} (first 5) -> {np.mean(losses[-5:]):.4f} (last 5)")

    state = adapter_state_dict(pipe.unet)
    native = save_adapter(out / "adapter.safetensors", state, config, {"base_model": base, "created_by": "krona demo"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LyCORISCompatibilityWarning)
        lyco = to_lycoris(state)
    from safetensors.torch import save_file

    save_file(lyco, out / "adapter_lycoris.safetensors")
    print(f"[4/6] saved {native} and {out / 'adapter_lycoris.safetensors'} (LoKr keys for ComfyUI/A1111/Forge)")
    if caught:
        print("      note: the LyCORIS Python library cannot rebuild (64, 8) factors; ComfyUI/A1111/Forge load them")

    fresh = load_pipeline(folder)
    fresh.set_progress_bar_config(disable=True)
    loaded = load_into_pipeline(fresh, native, scale=1.0)
    adapted = _generate(fresh, seed=0)
    _save_png(adapted, out / "adapted.png")
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
