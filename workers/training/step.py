"""One optimizer step: draw a noised batch, predict, take the denoising loss, update the factors.

    state = TrainState.start(spec, params)                  # optimizer + the one RNG of the run
    loss = train_step(components, data, spec, state)        # one optimizer step (with accumulation)

Every random draw (image choice, flips, latent sampling, noise, timesteps) comes from the state's one
CPU ``torch.Generator``, whose state is checkpointed, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from shared.training_spec import TrainingSpec

from .components import Components
from .data import PreparedData

__all__ = ["NoisedBatch", "TrainState", "denoising_loss", "sample_noised_batch", "train_step"]


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


def _make_optimizer(spec: TrainingSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=spec.learning_rate,
        betas=(spec.adam_beta1, spec.adam_beta2),
        weight_decay=spec.adam_weight_decay,
        eps=spec.adam_epsilon,
    )
    if spec.use_8bit_adam:
        try:
            # lazy: loads an optional package
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # foreach=False: the same arithmetic order on every run, which bitwise resume relies on.
    return torch.optim.AdamW(params, foreach=False, **kwargs)


@dataclass(frozen=True)
class NoisedBatch:
    """One draw of the training objective: which images, their clean latents, the noise and the timesteps."""

    index: torch.Tensor  # (b,) rows of the prepared data (a flipped copy is index + num_images)
    latents: torch.Tensor  # (b, 4, h, w) sampled from the cached distribution, shifted and scaled
    noise: torch.Tensor  # (b, 4, h, w)
    timesteps: torch.Tensor  # (b,)


def sample_noised_batch(
    components: Components, data: PreparedData, batch_size: int, generator: torch.Generator
) -> NoisedBatch:
    """Draw images (and flips), latents from their VAE distribution, noise and timesteps, in that order, from
    ``generator``; the order is part of exact resume."""
    vae_config = components.vae.config
    scaling = float(vae_config.scaling_factor)
    shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
    index = torch.randint(0, data.num_images, (batch_size,), generator=generator)
    if data.flips:
        flip = torch.randint(0, 2, (batch_size,), generator=generator)
        index = index + flip * data.num_images
    eps = torch.randn(data.latent_mean[index].shape, generator=generator)
    latents = data.latent_mean[index] + data.latent_std[index] * eps
    latents = (latents - shift) * scaling
    noise = torch.randn(latents.shape, generator=generator)
    num_train_timesteps = components.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return NoisedBatch(index, latents, noise, timesteps)


def _unet_loss(components: Components, data: PreparedData, batch: NoisedBatch) -> torch.Tensor:
    device, dtype = components.device, components.weight_dtype
    scheduler = components.noise_scheduler
    latents, noise, timesteps = batch.latents, batch.noise, batch.timesteps
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    size = latents.shape[0]
    kwargs: dict[str, Any] = {}
    if components.sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": data.pooled.expand(size, -1).to(device, dtype),
            "time_ids": data.time_ids[batch.index].to(device, dtype),
        }
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        pred = components.unet(
            noisy.to(device, dtype),
            timesteps.to(device),
            encoder_hidden_states=data.prompt_embeds.expand(size, -1, -1).to(device, dtype),
            **kwargs,
        ).sample
    return F.mse_loss(pred.float(), target.to(device).float())


def train_step(components: Components, data: PreparedData, spec: TrainingSpec, state: TrainState) -> float:
    """One optimizer step over ``gradient_accumulation`` micro-batches; returns the mean loss."""
    g = state.generator
    total = 0.0
    for _ in range(spec.gradient_accumulation):
        loss = _unet_loss(components, data, sample_noised_batch(components, data, spec.batch_size, g))
        if data.class_data is not None:
            class_batch = sample_noised_batch(components, data.class_data, spec.batch_size, g)
            prior = _unet_loss(components, data.class_data, class_batch)
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
    was_training = components.unet.training
    components.unet.eval()
    losses = []
    for _ in range(samples):
        losses.append(_unet_loss(components, data, sample_noised_batch(components, data, 1, g)).item())
    components.unet.train(was_training)
    return sum(losses) / len(losses)
