"""Step-level joining: one running denoising loop that requests join and leave between steps.

    loop = DenoisingLoop(engine, width=512, height=512)
    loop.join("gen_1", Request("a photo of sks dog", adapter_id="adp_1", seed=1), steps=25, guidance_scale=7.5)
    while loop.active:
        ...                                   # more requests may join here, at any step boundary
        for finished in loop.step():          # one UNet batch: every active request's next step
            images = loop.decode(finished)    # it left the loop; the others go on

Iteration-level batching (Orca, vLLM; S-LoRA and LoRAX with an adapter per request) applied to diffusion:
a request does not wait for a batch to form or to finish. Everything that differs between requests is kept
per request, so that each one's images equal what the pipeline gives it alone with the same seed (tested,
within float tolerance):

- its own scheduler (a copy of the pipeline's, from its config) with its own ``set_timesteps(steps)``, so
  requests with different step counts, or at different points of their schedules, share a UNet batch; its
  per-request state (Euler's step index, a multistep solver's history) stays its own;
- its own initial noise, drawn as the pipeline draws it (one CPU generator per image, seeded seed + k, scaled
  by its scheduler's ``init_noise_sigma``), and its generators for schedulers that add noise in ``step``;
- its own prompt embeddings (positive, and negative for classifier-free guidance), encoded by the pipeline's
  ``encode_prompt``, and its own guidance scale; a request with guidance <= 1 sends no unconditional rows;
- its own adapter slot and scale: the bank routes every UNet row (``shared/krona/bank.py`` ``Routing``).

Each step stacks the active requests' rows ([uncond; cond] per request with guidance), passes one timestep per
row (the UNet takes a 1-D tensor of batch size), splits the prediction back, and applies each request's guidance
and its scheduler's ``step``. SD 1.x/2.x-style pipelines and SDXL (pooled text and size ids per row) are handled.

The loop does not decide who joins: the caller (the worker, ``workers/inference/job.py``) does, at the step
boundaries, with the fair scheduler. ``max_images`` bounds the images in the loop; a request's adapter keeps its
slot (pinned) while it runs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .engine import Engine, Request

__all__ = ["Conditioning", "Denoising", "DenoisingLoop", "LoopGroup", "Sampler"]


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on for one request's rows: [uncond; cond] with classifier-free guidance."""

    cfg: bool  # classifier-free guidance: its UNet rows are [uncond; cond]
    embeds: torch.Tensor  # (rows, tokens, dim), rows = 2 x images with guidance, else images
    added: dict[str, torch.Tensor] | None  # SDXL: text_embeds (rows, d), time_ids (rows, 6)
    timestep_cond: torch.Tensor | None  # guidance-embedding UNets (time_cond_proj_dim): (rows, d)


@dataclass(frozen=True)
class Sampler:
    """One request's own copy of the pipeline's scheduler, at its step count, and the generators it draws with."""

    scheduler: Any
    timesteps: torch.Tensor
    generators: list[torch.Generator]
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # what the pipeline passes to scheduler.step


@dataclass
class Denoising:
    """One request in the loop: everything its denoising needs, apart from the shared UNet."""

    key: Hashable
    request: Request
    steps: int
    guidance_scale: float
    cond: Conditioning
    sampler: Sampler
    latents: torch.Tensor  # (images, channels, height / 8, width / 8)
    slot: int
    scale: float
    index: int = 0  # the next step
    setup_seconds: float = 0.0  # encoding its prompt and loading its adapter
    unet_seconds: float = 0.0  # its share of the steps it took part in (by UNet rows)
    decode_seconds: float = 0.0

    @property
    def images(self) -> int:
        return self.latents.shape[0]

    @property
    def rows(self) -> int:
        return self.cond.embeds.shape[0]

    @property
    def done(self) -> bool:
        return self.index >= len(self.sampler.timesteps)


class DenoisingLoop:
    """A running denoising loop for one shape bucket (width x height) of one engine's pipeline."""

    def __init__(
        self,
        engine: Engine,
        *,
        width: int | None = None,
        height: int | None = None,
        max_images: int | None = None,
        group: LoopGroup | None = None,
    ) -> None:
        pipe = engine.pipe
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.engine = engine
        self.width = width or default
        self.height = height or default
        self.max_images = max_images or engine.max_batch
        self.group = group  # the loops of other sizes beside it: one bound on images, one set of pinned slots
        self.active: list[Denoising] = []
        self.sdxl = pipe.unet.config.get("addition_embed_type") == "text_time"

    # Who is in the loop ----------------------------------------------------------------------------------

    @property
    def images(self) -> int:
        return sum(d.images for d in self.active)

    @property
    def room(self) -> int:
        """Images that may still join (in a group: the group's room)."""
        return self.group.room if self.group is not None else self.max_images - self.images

    def pinned(self) -> set[int]:
        """The slots of the running requests (in a group: of every loop's), which no adapter may take."""
        return self.group.pinned() if self.group is not None else {d.slot for d in self.active}

    def can_host(self, adapter_id: str | None) -> bool:
        """Whether a request for this adapter can get a slot now (the running requests' slots are pinned)."""
        return self.engine.can_host(adapter_id, self.pinned())

    def leave(self, key: Hashable) -> Denoising | None:
        """Take a request out of the loop unfinished (canceled, or its lease lost)."""
        for d in self.active:
            if d.key == key:
                self.active.remove(d)
                return d
        return None

    @torch.no_grad()
    def join(self, key: Hashable, request: Request, *, steps: int, guidance_scale: float) -> Denoising:
        """Prepare a request (adapter slot, prompt embeddings, scheduler, initial noise) and add it to the loop;
        it takes part in the next ``step``. Raises (AdapterShapeError, KeyError, ValueError, ...) without
        changing the loop when the request cannot run."""
        if request.num_images > self.room:
            raise ValueError(f"{request.num_images} images do not fit in the loop ({self.room} free)")
        started = time.perf_counter()
        with self.engine.lock:
            slot, scale = self.engine.slot_and_scale(request, self.pinned())
        cond = self._conditioning(request, guidance_scale)
        sampler, latents = self._sampler(request, steps, cond.embeds.dtype)
        d = Denoising(
            key=key,
            request=request,
            steps=steps,
            guidance_scale=guidance_scale,
            cond=cond,
            sampler=sampler,
            latents=latents,
            slot=slot,
            scale=scale,
        )
        d.setup_seconds = time.perf_counter() - started
        self.active.append(d)
        return d

    def _conditioning(self, request: Request, guidance_scale: float) -> Conditioning:
        """The request's prompt embeddings as its pipeline encodes them (the negative prompt's too, with guidance),
        SDXL's pooled text and size ids, and the guidance embedding of UNets that take one."""
        pipe = self.engine.pipe
        device = pipe._execution_device
        n = request.num_images
        cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        negative = request.negative_prompt or None
        added = None
        if self.sdxl:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=request.prompt,
                device=device,
                num_images_per_prompt=n,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative,
            )
            if pipe.text_encoder_2 is None:
                projection_dim = int(pooled.shape[-1])
            else:
                projection_dim = pipe.text_encoder_2.config.projection_dim
            size = (self.height, self.width)
            time_ids = pipe._get_add_time_ids(
                size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection_dim
            ).to(device)
            text_embeds = torch.cat([uncond_pooled, pooled]) if cfg else pooled
            added = {"text_embeds": text_embeds.to(device), "time_ids": time_ids.repeat(text_embeds.shape[0], 1)}
        else:
            cond, uncond = pipe.encode_prompt(request.prompt, device, n, cfg, negative)
        embeds = (torch.cat([uncond, cond]) if cfg else cond).to(device)
        timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(guidance_scale - 1).repeat(embeds.shape[0])
            timestep_cond = pipe.get_guidance_scale_embedding(
                guidance, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=cond.dtype)
        return Conditioning(cfg=cfg, embeds=embeds, added=added, timestep_cond=timestep_cond)

    def _sampler(self, request: Request, steps: int, dtype: torch.dtype) -> tuple[Sampler, torch.Tensor]:
        """The request's own scheduler at its step count, and its initial noise, drawn as the pipeline draws it: one
        CPU generator per image, seeded seed + k, scaled by the scheduler's ``init_noise_sigma``."""
        pipe = self.engine.pipe
        device = pipe._execution_device
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        if self.sdxl and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as the SDXL pipeline does
        generators = [torch.Generator().manual_seed(request.seed + k) for k in range(request.num_images)]
        factor = pipe.vae_scale_factor
        shape = (request.num_images, pipe.unet.config.in_channels, self.height // factor, self.width // factor)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        # The pipeline's own helper: eta for DDIM-like schedulers, the generators for those that add noise.
        sampler = Sampler(scheduler, scheduler.timesteps, generators, _step_kwargs(scheduler, generators))
        return sampler, latents * scheduler.init_noise_sigma

    # One step ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Denoising]:
        """One denoising step of every active request in one UNet batch; the requests that finished leave the
        loop and are returned (decode them with ``decode``)."""
        active = [d for d in self.active if not d.done]
        if not active:
            finished, self.active = self.active, []
            return finished
        started = time.perf_counter()
        engine = self.engine
        samples, timesteps, slots, scales = [], [], [], []
        for d in active:
            t = d.sampler.timesteps[d.index]
            rows = torch.cat([d.latents] * 2) if d.cond.cfg else d.latents
            samples.append(d.sampler.scheduler.scale_model_input(rows, t))
            timesteps.append(t.reshape(1).expand(d.rows))
            slots += [d.slot] * d.rows
            scales += [d.scale] * d.rows
        added = None
        if self.sdxl:
            added = {k: torch.cat([d.cond.added[k] for d in active]) for k in ("text_embeds", "time_ids")}
        timestep_cond = None
        if active[0].cond.timestep_cond is not None:
            timestep_cond = torch.cat([d.cond.timestep_cond for d in active])
        with engine.lock:
            engine.route(slots, scales)
            try:
                noise = engine.pipe.unet(
                    torch.cat(samples),
                    torch.cat(timesteps),  # one timestep per row: requests are at different points of their schedules
                    encoder_hidden_states=torch.cat([d.cond.embeds for d in active]),
                    timestep_cond=timestep_cond,
                    added_cond_kwargs=added,
                    return_dict=False,
                )[0]
            finally:
                engine.routing.clear()
        start = 0
        for d in active:
            pred = noise[start : start + d.rows]
            start += d.rows
            if d.cond.cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + d.guidance_scale * (text - uncond)
            t = d.sampler.timesteps[d.index]
            d.latents = d.sampler.scheduler.step(pred, t, d.latents, **d.sampler.step_kwargs, return_dict=False)[0]
            d.index += 1
        # The step's time is shared by the UNet rows each request had in it.
        seconds = time.perf_counter() - started
        total_rows = sum(d.rows for d in active)
        for d in active:
            d.unet_seconds += seconds * d.rows / total_rows
        finished = [d for d in self.active if d.done]
        self.active = [d for d in self.active if not d.done]
        return finished

    # Leaving -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, d: Denoising) -> list:
        """The finished request's images (numpy HWC float in [0, 1]), decoded as its pipeline decodes them."""
        started = time.perf_counter()
        pipe = self.engine.pipe
        latents = d.latents
        if self.sdxl:
            images = _decode_sdxl(pipe, latents)
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            image, nsfw = pipe.run_safety_checker(image, pipe._execution_device, d.cond.embeds.dtype)
            denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
            images = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=denormalize)
        d.decode_seconds = time.perf_counter() - started
        return list(images)


class LoopGroup:
    """The running loops of one engine, one per size (a UNet batch holds one latent shape): a request of another
    size starts a loop of its own instead of waiting for the running one to end, and the loops take turns, a step
    each. They share one bound on the images in flight (``max_images``) and the engine's slots: a slot that a
    request of any loop uses is pinned for all."""

    def __init__(self, engine: Engine, max_images: int | None = None) -> None:
        self.engine = engine
        self.max_images = max_images or engine.max_batch
        self.loops: dict[tuple[int, int], DenoisingLoop] = {}

    def loop(self, width: int, height: int) -> DenoisingLoop:
        """The loop of this size, started if there is none."""
        key = (width, height)
        if key not in self.loops:
            self.loops[key] = DenoisingLoop(
                self.engine, width=width, height=height, max_images=self.max_images, group=self
            )
        return self.loops[key]

    @property
    def active(self) -> list[Denoising]:
        return [d for loop in self.loops.values() for d in loop.active]

    @property
    def room(self) -> int:
        return self.max_images - sum(loop.images for loop in self.loops.values())

    def pinned(self) -> set[int]:
        return {d.slot for loop in self.loops.values() for d in loop.active}

    def can_host(self, adapter_id: str | None) -> bool:
        return self.engine.can_host(adapter_id, self.pinned())

    def running(self) -> list[DenoisingLoop]:
        """The loops with requests in them, in the order they started (the order of their turns); empty ones go."""
        for key in [key for key, loop in self.loops.items() if not loop.active]:
            del self.loops[key]
        return list(self.loops.values())

    def leave(self, key: Hashable) -> Denoising | None:
        for loop in self.loops.values():
            d = loop.leave(key)
            if d is not None:
                return d
        return None


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict[str, Any]:
    """What the pipelines' ``prepare_extra_step_kwargs`` passes to ``scheduler.step`` (eta 0, the generators)."""

    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def _decode_sdxl(pipe, latents: torch.Tensor):
    """The SDXL pipeline's decode: float32 VAE when a float16 one would overflow, the latents' mean and std."""
    needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if needs_upcasting:
        pipe.upcast_vae()
        latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
    config = pipe.vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="np")
