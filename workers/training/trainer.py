"""The training loop: the parts of DreamBooth-KronA fine-tuning run in order, with progress, cancellation,
checkpoints, resume and validation images.

    components = load_components(base)                      # frozen pipeline on the device   (components.py)
    data = prepare_data(components, images, spec)           # VAE latents + text embeddings   (data.py)
    params = build_adapter(components, spec)                # A ~ N(0, 1/a1), B = 0           (adapter.py)
    state = TrainState.start(spec, params)                  # optimizer + the one RNG          (step.py)
    loss = train_step(components, data, spec, state)        # one optimizer step               (step.py)
    save_checkpoint(dir, components, spec, state)           # factors, optimizer, step, RNG    (checkpoints.py)
    save_trained_adapter(path, components, spec, steps)     #                                  (adapter.py)

Class images for prior preservation come from class_images.py, validation images from validation.py.
Every random draw of the loop comes from one CPU ``torch.Generator`` whose state is checkpointed, so a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.images import SubjectImage
from shared.training_spec import TrainingSpec

from .adapter import build_adapter, save_trained_adapter
from .checkpoints import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .class_images import ClassImageCache, generate_class_images
from .components import Components, weight_dtype_for
from .data import prepare_data
from .step import TrainState, train_step
from .validation import render_validation_images

__all__ = ["Progress", "TrainingCanceled", "TrainingResult", "train"]


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


@dataclass(frozen=True)
class TrainingResult:
    adapter_path: Path
    steps: int
    losses: list[float]
    validation_images: list[Path]
    seconds: float
    resumed_from_step: int


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
    on_phase: Callable[[str], None] | None = None,
    class_image_cache: ClassImageCache | None = None,
) -> TrainingResult:
    """Train a KronA adapter on ``images`` and write it to ``output``.

    With ``checkpoint_dir`` and ``spec.checkpoint_every`` > 0, checkpoints are written every N steps
    (and on cancellation); ``resume=True`` continues from the newest one there. ``should_cancel`` is
    asked between steps (and between class images); on True a checkpoint is written and TrainingCanceled raised.
    ``on_phase`` hears "class_images" and "training" as they begin; ``class_image_cache`` holds class images
    across trainings (workers/training/class_images.py).
    """
    start = time.perf_counter()
    if components.weight_dtype != weight_dtype_for(spec.mixed_precision):
        raise ValueError(
            f"components were loaded in {components.weight_dtype} but mixed_precision={spec.mixed_precision!r}; "
            "pass mixed_precision to load_components too"
        )
    total_steps = spec.resolved_steps(components.sdxl)
    class_images = None
    if spec.prior_preservation:
        if on_phase is not None:
            on_phase("class_images")
        class_images = generate_class_images(components, spec, cache=class_image_cache, should_stop=should_cancel)
    if on_phase is not None:
        on_phase("training")
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
