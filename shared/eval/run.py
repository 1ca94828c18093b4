"""One evaluation run: generate the evaluation prompts' images with a base model (and an adapter: KronA, LyCORIS
LoKr or diffusers LoRA), score them with CLIP-I, CLIP-T and DINO against the subject's real images, and write the
images, a grid and a JSON report.

The generation is `krona generate`'s path (`shared.models.load_pipeline` + `shared.krona.load_into_pipeline`
+ the diffusers pipeline); the pipeline is freed before the scoring models load, so both never share memory.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, ClipEmbedder, DinoEmbedder, clip_i, clip_t, dino
from shared.eval.prompts import evaluation_prompts, image_seeds, prompt_data
from shared.eval.tiny import resolve_eval_model
from shared.images import ImageLimits, list_image_files, load_subject_images, save_image
from shared.krona.keys import is_lokr_key
from shared.models import load_pipeline

if TYPE_CHECKING:
    from shared.images import ImageLimits

METRICS = ("clip_i", "clip_t", "dino")


@dataclass
class PromptResult:
    """One prompt's images (paths), the text CLIP-T read, the seeds and its three scores."""

    prompt: str
    clip_t_text: str
    seeds: list[int]
    images: list[str]
    clip_i: float = float("nan")
    clip_t: float = float("nan")
    dino: float = float("nan")


@dataclass
class EvalReport:
    """What `krona eval` prints and writes as JSON: the settings, the mean scores and the per-prompt ones."""

    base_model: str
    adapter: str | None
    adapter_scale: float
    class_noun: str
    identifier: str
    prompts_source: str
    per_prompt: int
    steps: int
    guidance_scale: float
    base_seed: int
    clip_model: str
    dino_model: str
    real_images: list[str]
    grid: str
    scores: dict[str, float] = field(default_factory=dict)
    prompts: list[PromptResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # Set by the caller (`krona eval --heldout-images/--class-images`, workers.training.heldout): per set,
    # the prompt, the image count and the base and adapted mean denoising losses.
    heldout_loss: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def save_grid(rows: list[list[np.ndarray]], path: str | os.PathLike[str]) -> None:
    """A PNG grid of float images in [0, 1] (H, W, 3): one row per prompt, one column per seed."""

    height = max(image.shape[0] for row in rows for image in row)
    width = max(image.shape[1] for row in rows for image in row)
    columns = max(len(row) for row in rows)
    grid = np.ones((height * len(rows), width * columns, 3), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * height : r * height + image.shape[0], c * width : c * width + image.shape[1]] = image
    save_image(grid, path)


def is_diffusers_lora(path: str | os.PathLike[str]) -> bool:
    """A diffusers/PEFT LoRA file (``…lora_A.weight`` or ``…lora.down.weight`` keys), not a KronA or LoKr one."""
    # lazy: loads safetensors
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    lokr_or_krona = any(is_lokr_key(key) or ".krona_" in key for key in keys)
    return not lokr_or_krona and any(".lora_A." in key or ".lora.down." in key for key in keys)


def generate_images(
    base: str,
    adapter: str | None,
    prompts: list[str],
    seeds: list[int],
    *,
    adapter_scale: float = 1.0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    device: str | None = None,
) -> list[list[np.ndarray]]:
    """For each prompt, one float image (H, W, 3) per seed; image k of every prompt starts from seed k's noise."""

    # lazy: loads safetensors
    from shared.krona import load_into_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(base, device=device)
    if adapter and is_diffusers_lora(adapter):
        # `krona train --method lora` (the baseline) writes diffusers' LoRA format.
        pipe.load_lora_weights(str(adapter), adapter_name="evaluated")
        pipe.set_adapters(["evaluated"], adapter_weights=[adapter_scale])
    elif adapter:
        load_into_pipeline(pipe, adapter, scale=adapter_scale)
    pipe.set_progress_bar_config(disable=True)
    images = []
    try:
        for prompt in prompts:
            # One generator per image (on the CPU, so a seed gives the same noise on every device).
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            output = pipe(
                prompt,
                num_images_per_prompt=len(seeds),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
            )
            images.append(list(output.images))
    finally:
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return images


def evaluate(
    *,
    base: str,
    adapter: str | None,
    images_dir: str | os.PathLike[str],
    class_noun: str,
    out_dir: str | os.PathLike[str],
    identifier: str = "sks",
    prompts: str | Sequence[str] = "default",
    per_prompt: int = 4,
    adapter_scale: float = 1.0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    base_seed: int = 0,
    clip_model: str = DEFAULT_CLIP_MODEL,
    dino_model: str = DEFAULT_DINO_MODEL,
    device: str | None = None,
    image_limits: ImageLimits | None = None,
) -> EvalReport:
    """Generate, score and write `<out_dir>/images/pNN-sSEED.png` and `<out_dir>/grid.png`; return the report.

    ``prompts``: a prompt set, a file of templates, or the templates themselves (the service passes the first
    few of the default set). The real images are decoded with ``image_limits`` (the service's upload limits;
    default ``ImageLimits()``). Inputs are checked before any model loads (real images, prompts, counts).
    """

    if not 1 <= per_prompt <= 16:
        raise ValueError(f"--per-prompt must be between 1 and 16, got {per_prompt}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    real = [image.pixels for image in load_subject_images(images_dir, image_limits or ImageLimits())]
    real_names = [str(p) for p in list_image_files(images_dir)]
    eval_prompts = evaluation_prompts(prompts, identifier=identifier, class_noun=class_noun)
    seeds = image_seeds(per_prompt, base_seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if not isinstance(prompts, str):
        source = f"{len(eval_prompts)} templates given by the caller"
    else:
        source = prompt_data()["source"] if prompts in ("default", "object", "live") else prompts

    started = time.perf_counter()
    generated = generate_images(
        base,
        adapter,
        [p.prompt for p in eval_prompts],
        seeds,
        adapter_scale=adapter_scale,
        steps=steps,
        guidance_scale=guidance_scale,
        device=device,
    )
    generation_seconds = time.perf_counter() - started

    report = EvalReport(
        base_model=str(base),
        adapter=str(adapter) if adapter else None,
        adapter_scale=adapter_scale,
        class_noun=class_noun,
        identifier=identifier,
        prompts_source=source,
        per_prompt=per_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        base_seed=base_seed,
        clip_model=clip_model,
        dino_model=dino_model,
        real_images=real_names,
        grid=str(out / "grid.png"),
    )
    for index, (prompt, row) in enumerate(zip(eval_prompts, generated, strict=True)):
        paths = []
        for seed, image in zip(seeds, row, strict=True):
            path = out / "images" / f"p{index:02d}-s{seed}.png"
            save_image(image, path)
            paths.append(str(path))
        report.prompts.append(PromptResult(prompt=prompt.prompt, clip_t_text=prompt.text, seeds=seeds, images=paths))
    save_grid(generated, report.grid)

    started = time.perf_counter()
    clip = ClipEmbedder(resolve_eval_model(clip_model), device=device)
    for result, row in zip(report.prompts, generated, strict=True):
        result.clip_i = clip_i(clip, row, real)
        result.clip_t = clip_t(clip, row, result.clip_t_text)
    del clip
    dino_embedder = DinoEmbedder(resolve_eval_model(dino_model), device=device)
    for result, row in zip(report.prompts, generated, strict=True):
        result.dino = dino(dino_embedder, row, real)
    del dino_embedder
    # Every prompt has per_prompt images, so the mean of the prompts' means is the mean over all images.
    report.scores = {metric: float(np.mean([getattr(r, metric) for r in report.prompts])) for metric in METRICS}
    report.seconds = {"generation": generation_seconds, "scoring": time.perf_counter() - started}
    return report


def write_report(report: EvalReport, path: str | os.PathLike[str]) -> None:
    """The report as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
