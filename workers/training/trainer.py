"""DreamBooth fine-tuning of KronA factors only, split into parts that tests and workers can call.

    components = load_components(base)                      # frozen pipeline on the device
    data = prepare_data(components, images, spec)           # VAE latents + text embeddings, once
    params = build_adapter(components, spec)                # A ~ N(0, 1/a1), B = 0 on the targets
    state = TrainState.start(spec, params)                  # optimizer + the one RNG of the run
    loss = train_step(components, data, spec, state)        # one optimizer step (with accumulation)
    save_checkpoint(dir, components, spec, state)           # factors, optimizer, step, RNG
    save_trained_adapter(path, components, spec)

``train`` runs them in order with progress, cancellation, checkpoints, resume and validation.
Every random draw of the loop (image choice, flips, latent sampling, noise, timesteps) comes from one
CPU ``torch.Generator`` whose state is checkpointed, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.images import SubjectImage
from shared.krona import (
    adapter_state_dict,
    inject_adapter,
    krona_layers,
    load_adapter_state_dict,
    save_adapter,
    set_keep_intermediate,
)
from shared.training_spec import TrainingSpec

from .components import Components, encode_prompt, native_resolution, weight_dtype_for
from .data import to_training_tensor

__all__ = [
    "PreparedData",
    "Progress",
    "TrainState",
    "TrainingCanceled",
    "TrainingResult",
    "build_adapter",
    "denoising_loss",
    "find_latest_checkpoint",
    "load_checkpoint",
    "prepare_data",
    "render_validation_images",
    "save_checkpoint",
    "save_trained_adapter",
    "train",
    "train_step",
]

ADAPTER_NAME = "default"


class TrainingCanceled(Exception):
    """Raised by ``train`` when ``should_cancel`` said so; a checkpoint of the last step was written."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"training canceled after step {step}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    eta_seconds: float
    elapsed_seconds: float


@dataclass
class PreparedData:
    """Everything frozen, computed once: latent distributions and text conditioning.

    The VAE and text encoders are frozen, so encoding them every step (as the plain DreamBooth
    scripts do) would only repeat the same work; the latent *distribution* (mean, std) is cached and
    sampled each step, which keeps the VAE's sampling noise in training.
    """

    latent_mean: torch.Tensor  # (n, 4, h, w); flipped copies follow when random_flip is on
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor  # (1, 77, D)
    pooled: torch.Tensor | None  # (1, P) for SDXL
    time_ids: torch.Tensor | None  # (n, 6) for SDXL: original size, crop top-left, target size
    num_images: int
    flips: bool
    class_data: PreparedData | None = None


@dataclass
class TrainState:
    """What changes during the run and must be checkpointed to resume exactly."""

    step: int
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    params: list[torch.nn.Parameter]
    losses: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, spec: TrainingSpec, params: list[torch.nn.Parameter]) -> TrainState:
        generator = torch.Generator().manual_seed(spec.seed + 1)  # spec.seed itself initialises the factors
        return cls(step=0, optimizer=_make_optimizer(spec, params), generator=generator, params=params)


@dataclass(frozen=True)
class TrainingResult:
    adapter_path: Path
    steps: int
    losses: list[float]
    validation_images: list[Path]
    seconds: float
    resumed_from_step: int


def _make_optimizer(spec: TrainingSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=spec.learning_rate,
        betas=(spec.adam_beta1, spec.adam_beta2),
        weight_decay=spec.adam_weight_decay,
        eps=spec.adam_epsilon,
    )
    if spec.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # foreach=False: the same arithmetic order on every run, which bitwise resume relies on.
    return torch.optim.AdamW(params, foreach=False, **kwargs)


@torch.no_grad()
def _encode_images(components: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vae = components.vae
    dist = vae.encode(pixels.to(components.device, torch.float32)).latent_dist
    return dist.mean.cpu(), dist.std.cpu()


def _prepare_set(
    components: Components, images: Sequence[SubjectImage], prompt: str, resolution: int, flips: bool
) -> PreparedData:
    tensors, sizes, crops = [], [], []
    for image in images:
        tensor, size, crop = to_training_tensor(image, resolution)
        tensors.append(tensor)
        sizes.append(size)
        crops.append(crop)
    pixels = torch.stack(tensors)
    if flips:
        pixels = torch.cat([pixels, torch.flip(pixels, dims=[3])])
        sizes, crops = sizes * 2, crops * 2
    mean, std = [], []
    for chunk in pixels.split(4):  # bounded VAE memory at 1024 px
        m, s = _encode_images(components, chunk)
        mean.append(m)
        std.append(s)
    embeds, pooled = encode_prompt(components, prompt)
    time_ids = None
    if components.sdxl:
        time_ids = torch.tensor(
            [[*size, *crop, resolution, resolution] for size, crop in zip(sizes, crops, strict=True)]
        )
        time_ids = time_ids.to(torch.float32)
    return PreparedData(
        latent_mean=torch.cat(mean),
        latent_std=torch.cat(std),
        prompt_embeds=embeds.cpu(),
        pooled=None if pooled is None else pooled.cpu(),
        time_ids=time_ids,
        num_images=len(images),
        flips=flips,
    )


def prepare_data(
    components: Components,
    images: Sequence[SubjectImage],
    spec: TrainingSpec,
    *,
    class_images: Sequence[SubjectImage] | None = None,
) -> PreparedData:
    """Encode the subject images (and class images for prior preservation) and the prompts once."""
    if not images:
        raise ValueError("no subject images")
    # A worker reuses components across jobs; the encoders may have been parked on the CPU by the last one.
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(components.pipe, name, None)
        if module is not None:
            module.to(components.device)
    resolution = spec.resolution or native_resolution(components)
    data = _prepare_set(components, images, spec.instance_prompt, resolution, spec.random_flip)
    if spec.prior_preservation:
        if not class_images:
            raise ValueError("prior_preservation is on but no class images were given or generated")
        data.class_data = _prepare_set(components, class_images, spec.class_prompt or "", resolution, spec.random_flip)
    # The text encoders are no longer needed on the device while the UNet trains.
    if components.device.type != "cpu":
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(components.pipe, name, None)
            if module is not None:
                module.to("cpu")
        components.vae.to("cpu")
        torch.cuda.empty_cache()
    return data


@torch.no_grad()
def generate_class_images(components: Components, spec: TrainingSpec) -> list[SubjectImage]:
    """Prior-preservation images of the class, made by the base model itself (seeded, so resumable)."""
    import numpy as np

    resolution = spec.resolution or native_resolution(components)
    generator = torch.Generator().manual_seed(spec.seed + 2)
    images = []
    for index in range(spec.num_class_images):
        out = components.pipe(
            spec.class_prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=spec.validation_steps,
            generator=generator,
            output_type="np",
        ).images[0]
        pixels = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        images.append(SubjectImage(name=f"class-{index}", pixels=pixels))
    return images


def build_adapter(components: Components, spec: TrainingSpec) -> list[torch.nn.Parameter]:
    """Inject the KronA factors (float32, seeded by spec.seed) and return them; nothing else trains."""
    unet = components.unet
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(spec.seed)
    inject_adapter(unet, spec.krona_config(), ADAPTER_NAME, dtype=torch.float32, generator=generator)
    set_keep_intermediate(unet, spec.keep_intermediate)
    params = []
    for _, layer in sorted(krona_layers(unet).items()):
        for factor in (layer.krona_a[ADAPTER_NAME], layer.krona_b[ADAPTER_NAME]):
            factor.data = factor.data.to(components.device)
            factor.requires_grad_(True)
            params.append(factor)
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


def _sample_batch(data: PreparedData, batch_size: int, generator: torch.Generator, scaling: float, shift: float):
    index = torch.randint(0, data.num_images, (batch_size,), generator=generator)
    if data.flips:
        flip = torch.randint(0, 2, (batch_size,), generator=generator)
        index = index + flip * data.num_images
    eps = torch.randn(data.latent_mean[index].shape, generator=generator)
    latents = data.latent_mean[index] + data.latent_std[index] * eps
    return index, (latents - shift) * scaling


def _unet_loss(
    components: Components,
    data: PreparedData,
    index: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    device, dtype = components.device, components.weight_dtype
    scheduler = components.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    batch = latents.shape[0]
    kwargs: dict[str, Any] = {}
    if components.sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": data.pooled.expand(batch, -1).to(device, dtype),
            "time_ids": data.time_ids[index].to(device, dtype),
        }
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        pred = components.unet(
            noisy.to(device, dtype),
            timesteps.to(device),
            encoder_hidden_states=data.prompt_embeds.expand(batch, -1, -1).to(device, dtype),
            **kwargs,
        ).sample
    return F.mse_loss(pred.float(), target.to(device).float())


def train_step(components: Components, data: PreparedData, spec: TrainingSpec, state: TrainState) -> float:
    """One optimizer step over ``gradient_accumulation`` micro-batches; returns the mean loss."""
    scheduler = components.noise_scheduler
    vae_config = components.vae.config
    scaling = float(vae_config.scaling_factor)
    shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
    g = state.generator
    total = 0.0
    for _ in range(spec.gradient_accumulation):
        index, latents = _sample_batch(data, spec.batch_size, g, scaling, shift)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (spec.batch_size,), generator=g)
        loss = _unet_loss(components, data, index, latents, noise, timesteps)
        if data.class_data is not None:
            c_index, c_latents = _sample_batch(data.class_data, spec.batch_size, g, scaling, shift)
            c_noise = torch.randn(c_latents.shape, generator=g)
            c_timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (spec.batch_size,), generator=g)
            prior = _unet_loss(components, data.class_data, c_index, c_latents, c_noise, c_timesteps)
            loss = loss + spec.prior_loss_weight * prior
        (loss / spec.gradient_accumulation).backward()
        total += loss.item()
    if spec.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(state.params, spec.max_grad_norm, foreach=False)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    mean = total / spec.gradient_accumulation
    if not math.isfinite(mean):
        raise FloatingPointError(f"loss became {mean} at step {state.step}; lower the learning rate")
    state.losses.append(mean)
    return mean


@torch.no_grad()
def denoising_loss(components: Components, data: PreparedData, *, seed: int, samples: int = 16) -> float:
    """Mean denoising loss over fixed (image, noise, timestep) draws: the held-out measure of fit."""
    g = torch.Generator().manual_seed(seed)
    vae_config = components.vae.config
    scaling = float(vae_config.scaling_factor)
    shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
    was_training = components.unet.training
    components.unet.eval()
    losses = []
    for _ in range(samples):
        index, latents = _sample_batch(data, 1, g, scaling, shift)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (1,), generator=g)
        losses.append(_unet_loss(components, data, index, latents, noise, timesteps).item())
    components.unet.train(was_training)
    return sum(losses) / len(losses)


# Checkpoints ------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"


def save_checkpoint(
    directory: str | os.PathLike, components: Components, spec: TrainingSpec, state: TrainState, *, keep: int = 2
) -> Path:
    """Write ``<directory>/checkpoint-<step>/`` atomically (temp folder, then rename); keep the newest ``keep``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        factors = adapter_state_dict(components.unet, ADAPTER_NAME)
        save_adapter(tmp / "adapter.safetensors", factors, spec.krona_config(), {"base_model": components.base_model})
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"generator": state.generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        meta = {"step": state.step, "losses": state.losses, "spec": spec.to_dict(), "base_model": components.base_model}
        (tmp / "state.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``directory`` (or ``directory`` itself if it is one)."""
    root = Path(directory)
    if (root / "state.json").is_file():
        return root
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def load_checkpoint(path: str | os.PathLike, components: Components, spec: TrainingSpec, state: TrainState) -> None:
    """Restore factors, optimizer, step, losses and RNG; refuses a checkpoint made with other settings."""
    from shared.krona import load_adapter

    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    saved = TrainingSpec.from_dict(meta["spec"])
    ignore = {"steps", "checkpoint_every", "validation_every", "validation_prompt", "num_validation_images"}
    differing = sorted(k for k, v in spec.to_dict().items() if k not in ignore and saved.to_dict()[k] != v)
    if differing:
        raise ValueError(f"checkpoint {path} was made with different settings ({', '.join(differing)}); cannot resume")
    factors, _, _ = load_adapter(path / "adapter.safetensors")
    load_adapter_state_dict(components.unet, factors, ADAPTER_NAME)
    state.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    state.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    state.step = int(meta["step"])
    state.losses = list(meta["losses"])


def save_trained_adapter(path: str | os.PathLike, components: Components, spec: TrainingSpec, steps: int) -> Path:
    """The final adapter file (native format), with the base model and training parameters in its metadata."""
    factors = adapter_state_dict(components.unet, ADAPTER_NAME)
    metadata = {
        "base_model": components.base_model,
        "created_by": "krona train",
        "training": json.dumps({**spec.to_dict(), "steps": steps}),
    }
    return save_adapter(path, factors, spec.krona_config(), metadata)


@torch.no_grad()
def render_validation_images(
    components: Components, spec: TrainingSpec, directory: str | os.PathLike, step: int
) -> list[Path]:
    """Images of ``validation_prompt`` (or the instance prompt) with the adapter as it is now."""
    import numpy as np
    from PIL import Image

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pipe = components.pipe
    was_training = pipe.unet.training
    pipe.unet.eval()
    moved = []
    if components.device.type != "cpu":  # encoders were parked on the CPU after caching
        for name in ("text_encoder", "text_encoder_2", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and next(module.parameters()).device != components.device:
                module.to(components.device)
                moved.append(module)
    resolution = spec.resolution or native_resolution(components)
    generator = torch.Generator().manual_seed(spec.seed)
    paths = []
    for index in range(spec.num_validation_images):
        image = pipe(
            spec.validation_prompt or spec.instance_prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=spec.validation_steps,
            generator=generator,
            output_type="np",
        ).images[0]
        path = out / f"step-{step:07d}-{index}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    for module in moved:
        module.to("cpu")
    pipe.unet.train(was_training)
    return paths


def train(
    spec: TrainingSpec,
    components: Components,
    images: Sequence[SubjectImage],
    output: str | os.PathLike,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    validation_dir: str | os.PathLike | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainingResult:
    """Train a KronA adapter on ``images`` and write it to ``output``.

    With ``checkpoint_dir`` and ``spec.checkpoint_every`` > 0, checkpoints are written every N steps
    (and on cancellation); ``resume=True`` continues from the newest one there. ``should_cancel`` is
    asked between steps; on True a checkpoint is written and TrainingCanceled raised.
    """
    start = time.perf_counter()
    if components.weight_dtype != weight_dtype_for(spec.mixed_precision):
        raise ValueError(
            f"components were loaded in {components.weight_dtype} but mixed_precision={spec.mixed_precision!r}; "
            "pass mixed_precision to load_components too"
        )
    total_steps = spec.resolved_steps(components.sdxl)
    class_images = generate_class_images(components, spec) if spec.prior_preservation else None
    data = prepare_data(components, images, spec, class_images=class_images)
    params = build_adapter(components, spec)
    state = TrainState.start(spec, params)
    resumed_from = 0
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint directory")
        latest = find_latest_checkpoint(checkpoint_dir)
        if latest is None:
            raise ValueError(f"no checkpoint to resume from in {checkpoint_dir}")
        load_checkpoint(latest, components, spec, state)
        resumed_from = state.step
        if state.step > total_steps:
            raise ValueError(f"checkpoint is at step {state.step}, beyond the {total_steps} steps asked for")
    validation_images: list[Path] = []
    loop_start = time.perf_counter()
    while state.step < total_steps:
        if should_cancel is not None and should_cancel():
            saved = save_checkpoint(checkpoint_dir, components, spec, state) if checkpoint_dir else None
            raise TrainingCanceled(state.step, saved)
        loss = train_step(components, data, spec, state)
        if on_progress is not None:
            done = state.step - resumed_from
            elapsed = time.perf_counter() - loop_start
            eta = elapsed / done * (total_steps - state.step)
            on_progress(Progress(state.step, total_steps, loss, spec.learning_rate, eta, elapsed))
        if checkpoint_dir and spec.checkpoint_every and state.step % spec.checkpoint_every == 0:
            saved = save_checkpoint(checkpoint_dir, components, spec, state)
            if on_checkpoint is not None:
                on_checkpoint(saved)
        if validation_dir and spec.validation_every and state.step % spec.validation_every == 0:
            validation_images += render_validation_images(components, spec, validation_dir, state.step)
    adapter_path = save_trained_adapter(output, components, spec, total_steps)
    if validation_dir:
        validation_images += render_validation_images(components, spec, validation_dir, state.step)
    return TrainingResult(
        adapter_path=Path(adapter_path),
        steps=state.step,
        losses=list(state.losses),
        validation_images=validation_images,
        seconds=time.perf_counter() - start,
        resumed_from_step=resumed_from,
    )
