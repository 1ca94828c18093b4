"""Seconds per training step and activation memory: KronA vs PEFT LoRA rank 4 vs PEFT LoKr, full-size SD 1.5 UNet.

The UNet is built from the real SD 1.5 config with random weights (nothing is downloaded). Every
method gets its own copy of the module tree sharing the one set of frozen weights, with its adapter on
to_q/to_k/to_v/to_out.0, and full training steps (forward, backward, AdamW step) on one latent of the
given size with 77 text tokens run interleaved: A, B, C, A, B, C, ... On this shared CPU step times
drift by ±25% over minutes, so interleaving exposes every method to the same drift, and s/step is
the fastest step (noise only adds time; the median is printed and in the JSON too).

Memory is `saved_activation_mb`: the tensors autograd keeps for backward in one forward, frozen
weights excluded, each storage counted once. That is exact and it is the part of training memory
that differs between adapters (the resident-set peak on the CPU mostly measures the allocator).

  krona      shared.krona, the paper's factors (64, 8), as the trainer runs it (X @ B.T recomputed
             in backward: keep_intermediate=False)
  krona_keep the same with keep_intermediate=True (X @ B.T kept for backward)
  lora_r4    PEFT LoRA rank 4 (peft.inject_adapter_in_model, as diffusers' trainers do)
  peft_lokr  PEFT LoKr with the same full factors (64, 8) put in place of its own

It also measures what caching the frozen VAE latents and text embeddings saves: the per-step cost
of encoding the image (full-size SD 1.5 VAE) and the prompt (full-size CLIP ViT-L text encoder),
and the whole run of N steps with and without the cache.

    python benchmarks/train_step.py [--quick] [--json PATH] [--latent 32] [--steps 5] [--run-steps 500]

Summary fields: step_ratio_to_lora (krona s/step / lora_r4 s/step), peak_mem_ratio_to_lora (saved
activations, krona / lora_r4), keep_step_ratio_to_lora and keep_peak_mem_ratio_to_lora for krona_keep,
step_ratio_peft_lokr_to_krona,
cache_saving_fraction (share of a whole run's time saved by caching).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("krona", "krona_keep", "lora_r4", "peft_lokr")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _attach(unet, method: str) -> list:
    """Add ``method``'s adapter to the attention projections; its trainable parameters, float32 (as the trainer
    keeps them on a half-precision base)."""
    import torch
    from torch import nn

    unet.requires_grad_(False)
    if method in ("krona", "krona_keep"):
        from shared.krona import KronaConfig, inject_adapter, set_keep_intermediate

        inject_adapter(unet, KronaConfig(a1=64, a2=8, target_modules=tuple(TARGETS)), dtype=torch.float32)
        set_keep_intermediate(unet, method == "krona_keep")
        params = [p for n, p in unet.named_parameters() if "krona_" in n]
    elif method == "lora_r4":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), unet)
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
    elif method == "peft_lokr":
        from peft import LoKrConfig, inject_adapter_in_model

        inject_adapter_in_model(LoKrConfig(r=8, target_modules=TARGETS), unet)
        params = []
        for module in unet.modules():
            if hasattr(module, "lokr_w1") and "default" in getattr(module, "lokr_w1", {}):
                base = module.get_base_layer()
                d_out, d_in = base.out_features, base.in_features
                for name in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"):
                    holder = getattr(module, name)
                    if "default" in holder:
                        del holder["default"]
                device = base.weight.device
                module.lokr_w1["default"] = nn.Parameter(torch.randn(64, 8, device=device) / 64)
                module.lokr_w2["default"] = nn.Parameter(torch.zeros(d_out // 64, d_in // 8, device=device))
                module.scaling["default"] = 1.0
                params += [module.lokr_w1["default"], module.lokr_w2["default"]]
    else:
        raise ValueError(method)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _saved_activation_mb(model, forward) -> float:
    """MB of tensors autograd keeps for backward in one forward, frozen weights excluded, each storage once.

    This is the part of training memory that differs between adapters; unlike the RSS peak it does not
    depend on the allocator's caching.
    """
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(sizes.values()) / 2**20


def conditioning(config: dict, batch: int, generator) -> dict:
    """Random text conditioning for a UNet of this config: 77 token states of its cross-attention width, and
    SDXL's pooled text embedding and six size/crop ids when it has the text_time embedding."""
    import torch

    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch),
        }
    return kwargs


def measure_steps(
    latent: int,
    steps: int,
    methods: list[str],
    *,
    unet_config: dict | None = None,
    device: str = "cpu",
    dtype=None,
) -> list[dict]:
    """Time every method in one process, interleaved step by step, all sharing one set of frozen weights.

    On this shared CPU, step times drift by ±25% over minutes; running method A, B, C, A, B, C, ...
    exposes every method to the same drift, and the fastest step of each is its best estimate.

    ``unet_config``: the UNet (default SD 1.5's); ``device`` and ``dtype``: where the frozen weights live and in
    what precision (a half-precision dtype trains as the trainer does: weights in it, the step under autocast,
    factors float32). On CUDA each row also has ``peak_memory_mb``, the most memory allocated during its steps
    (the shared frozen weights included).
    """
    import contextlib
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    from shared.models import REFERENCE_UNET_CONFIGS

    config = unet_config or REFERENCE_UNET_CONFIGS["sd15"]
    dtype = dtype or torch.float32
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they are used (an SDXL UNet takes ~40 s on a CPU)
        base = UNet2DConditionModel(**config).requires_grad_(False).to(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    channels = config.get("in_channels") or 4
    latents = torch.randn(1, channels, latent, latent, generator=g).to(device, dtype)
    cond = conditioning(config, 1, g)
    cond = {
        "encoder_hidden_states": cond["encoder_hidden_states"].to(device, dtype),
        **(
            {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in cond["added_cond_kwargs"].items()}}
            if "added_cond_kwargs" in cond
            else {}
        ),
    }
    target = torch.randn(1, channels, latent, latent, generator=g).to(device)
    timestep = torch.tensor([500], device=device)
    runs = {}
    for method in methods:
        # A copy of the module tree that shares the (frozen, never written) weight tensors.
        unet = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
        torch.manual_seed(0)
        params = _attach(unet, method)
        unet.train()
        runs[method] = (unet, params, torch.optim.AdamW(params, lr=1e-3))

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def forward(unet):
        with autocast():
            return unet(latents, timestep, **cond).sample

    def step(method: str) -> None:
        unet, _, optimizer = runs[method]
        torch.nn.functional.mse_loss(forward(unet).float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = dict.fromkeys(methods, 0.0)
    for method in methods:
        step(method)  # warm-up: allocates optimizer state and gradient buffers once
    for _ in range(steps):
        for method in methods:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(method)
            sync()
            times[method].append(time.perf_counter() - start)
            if cuda:
                peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated() / 2**20)
    rows = []
    for method in methods:
        unet, params, _ = runs[method]
        row = {
            "method": method,
            "trainable_parameters": sum(p.numel() for p in params),
            "seconds_per_step": min(times[method]),
            "median_seconds_per_step": statistics.median(times[method]),
            "step_seconds": times[method],
            "saved_activation_mb": _saved_activation_mb(unet, lambda unet=unet: forward(unet)),
        }
        if cuda:
            row["peak_memory_mb"] = peaks[method]
        rows.append(row)
    return rows


def measure_encoding(latent: int, steps: int) -> dict:
    """Per-step cost of what caching removes: VAE encode of one image, CLIP text encode of one prompt."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).requires_grad_(False)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    ).requires_grad_(False)
    image = torch.randn(1, 3, latent * 8, latent * 8)
    ids = torch.randint(0, 49407, (1, 77))
    vae_times, text_times = [], []
    with torch.no_grad():
        vae.encode(image)
        text(ids)
        for _ in range(steps):
            start = time.perf_counter()
            vae.encode(image).latent_dist.sample()
            vae_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            text(ids)
            text_times.append(time.perf_counter() - start)
    return {"vae_encode_seconds": statistics.median(vae_times), "text_encode_seconds": statistics.median(text_times)}


def summarize(rows: list[dict], encode: dict, run_steps: int) -> dict:
    """Ratios against LoRA r4 for the trainer's default (krona: X @ B.T recomputed) and for krona_keep."""
    by = {r["method"]: r for r in rows}
    lora = by["lora_r4"]
    step = by["krona"]["seconds_per_step"]
    # Cached: encode each image (5 of them) and the prompt once; uncached: both every step.
    cached_run = run_steps * step + 5 * encode["vae_encode_seconds"] + encode["text_encode_seconds"]
    uncached_run = run_steps * (step + encode["vae_encode_seconds"] + encode["text_encode_seconds"])
    summary = {
        "step_ratio_to_lora": round(step / lora["seconds_per_step"], 3),
        "peak_mem_ratio_to_lora": round(by["krona"]["saved_activation_mb"] / lora["saved_activation_mb"], 3),
        "step_ratio_peft_lokr_to_krona": round(by["peft_lokr"]["seconds_per_step"] / step, 3),
        "peak_mem_ratio_peft_lokr_to_krona": round(
            by["peft_lokr"]["saved_activation_mb"] / by["krona"]["saved_activation_mb"], 3
        ),
    }
    if "krona_keep" in by:
        keep = by["krona_keep"]
        summary["keep_step_ratio_to_lora"] = round(keep["seconds_per_step"] / lora["seconds_per_step"], 3)
        summary["keep_peak_mem_ratio_to_lora"] = round(keep["saved_activation_mb"] / lora["saved_activation_mb"], 3)
    summary.update(
        {
            "vae_encode_seconds": round(encode["vae_encode_seconds"], 3),
            "text_encode_seconds": round(encode["text_encode_seconds"], 3),
            "run_minutes_uncached": round(uncached_run / 60, 2),
            "run_minutes_cached": round(cached_run / 60, 2),
            "cache_saving_fraction": round(1 - cached_run / uncached_run, 3),
        }
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16 latents (128 px), 2 timed steps")
    parser.add_argument("--json", type=Path, help="write {'rows': [...], 'summary': {...}, 'machine': {...}}")
    parser.add_argument("--latent", type=int, help="latent side (default 32 = 256 px; 16 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per method (default 5; 2 with --quick)")
    parser.add_argument("--run-steps", type=int, default=500, help="steps of the whole run for the caching estimate")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    args = parser.parse_args(argv)

    latent = args.latent or (16 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 5)
    import torch

    print(f"# train_step: full-size SD 1.5 UNet (random weights), latent {latent}x{latent} ({latent * 8} px), batch 1,")
    print(f"# 77 tokens, float32 on CPU ({torch.get_num_threads()} threads), fastest of {steps} steps after warm-up")
    print(f"{'method':<16} {'trainable':>11} {'s/step':>8} {'median':>8} {'activations MB':>15}")
    rows = measure_steps(latent, steps, args.methods.split(","))
    for row in rows:
        print(
            f"{row['method']:<16} {row['trainable_parameters']:>11,} {row['seconds_per_step']:>8.2f} "
            f"{row['median_seconds_per_step']:>8.2f} {row['saved_activation_mb']:>15.1f}",
            flush=True,
        )
    encode = measure_encoding(latent, steps)
    summary = summarize(rows, encode, args.run_steps)
    vae_s, text_s = encode["vae_encode_seconds"], encode["text_encode_seconds"]
    print(f"caching saves per step: VAE encode {vae_s:.2f} s + text encode {text_s:.3f} s")
    print(
        f"whole {args.run_steps}-step run: {summary['run_minutes_uncached']:.1f} min uncached -> "
        f"{summary['run_minutes_cached']:.1f} min cached"
    )
    print("summary:", json.dumps(summary, indent=1))
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "latent": latent,
        "steps": steps,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": rows, "encode": encode, "summary": summary, "machine": machine}, indent=1) + "\n"
        )
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
