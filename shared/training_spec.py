"""TrainingSpec: every knob of a DreamBooth-KronA run, validated before any work starts.

Torch-free: the gateway validates a request's params with it; the trainer runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared.krona import DEFAULT_TARGET_MODULES, KronaConfig

__all__ = [
    "MAX_PROMPT_CHARS",
    "MAX_TARGET_MODULES",
    "MAX_TARGET_MODULE_CHARS",
    "METHODS",
    "MIXED_PRECISION",
    "EvaluationRequest",
    "TrainingSpec",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
# "krona": DiffuseKronA factors (the product); "lora": PEFT LoRA on the same targets and loop, the paper's
# baseline, for comparisons (`krona train --method lora`; not a service parameter).
METHODS = ("krona", "lora")
# Caps on the free text a client sends in a training's params.
MAX_PROMPT_CHARS = 1000
MAX_TARGET_MODULES = 16
MAX_TARGET_MODULE_CHARS = 100


@dataclass(frozen=True)
class EvaluationRequest:
    """How an adapter is scored (CLIP-I, CLIP-T, DINO; shared/eval): the first ``prompts`` of DreamBooth's
    evaluation prompts for the class, ``per_prompt`` images each (seeds 0..per_prompt-1), ``steps`` denoising
    steps. Kept small on purpose: the score is a check, not the paper's 25 x 4 protocol (use `krona eval`).

    class_noun: the subject's class ("dog"); ``None`` takes the last word of the instance prompt.
    identifier: the rare token ("sks"); ``None`` takes the word before the class noun in the instance prompt.
    """

    prompts: int = 4
    per_prompt: int = 2
    steps: int = 25
    class_noun: str | None = None
    identifier: str | None = None

    def __post_init__(self) -> None:
        _check_int("evaluate.prompts", self.prompts, 1, 25)
        _check_int("evaluate.per_prompt", self.per_prompt, 1, 4)
        _check_int("evaluate.steps", self.steps, 1, 100)
        for name in ("class_noun", "identifier"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip() or len(value) > 100 or not value.isprintable():
                raise ValueError(f"evaluate.{name} must be a non-empty printable string of at most 100 characters")

    @classmethod
    def parse(cls, value: Any) -> EvaluationRequest | None:
        """``params.evaluate``: false/None (no evaluation), true (the defaults) or an object of the fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise ValueError('evaluate must be true, false or an object such as {"prompts": 4, "per_prompt": 2}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown evaluate fields: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)

    def initial_state(
        self,
        *,
        instance_prompt: str,
        clip_model: str,
        dino_model: str,
        reference_images: int,
        requested_at: str,
        status: str = "queued",
    ) -> dict[str, Any]:
        """The JSON of ``adapters.evaluation`` for this request, before any score (shared/schemas.py presents it)."""
        identifier, class_noun = self.subject_words(instance_prompt)
        return {
            "status": status,
            "clip_i": None,
            "clip_t": None,
            "dino": None,
            "prompts": self.prompts,
            "images_per_prompt": self.per_prompt,
            "steps": self.steps,
            "class_noun": class_noun,
            "identifier": identifier,
            "reference_images": reference_images,
            "models": {"clip": clip_model, "dino": dino_model},
            "error": None,
            "requested_at": requested_at,
            "finished_at": None,
        }

    def subject_words(self, instance_prompt: str) -> tuple[str, str]:
        """(identifier, class noun): the given ones, or read off the instance prompt ("a photo of sks dog")."""
        words = instance_prompt.split()
        class_noun = self.class_noun or (words[-1] if words else "")
        identifier = self.identifier
        if identifier is None:
            index = len(words) - 1 - words[::-1].index(class_noun) if class_noun in words else len(words)
            identifier = words[index - 1] if index >= 1 else ""
        return identifier, class_noun


@dataclass(frozen=True)
class TrainingSpec:
    """Hyperparameters of one fine-tune; the defaults are the paper's (DiffuseKronA scripts, SD 1.5/2.1).

    steps: optimizer steps (each of ``gradient_accumulation`` micro-batches). The paper uses 500 for
        SD 1.x/2.x and 1000 for SDXL at 1024 px; ``None`` picks that by model family.
    learning_rate: AdamW, constant. The paper's scripts use 1e-3; its ablation finds the best
        fidelity/diversity near 6e-4, overfitting above 1e-3 and lost fidelity below 1e-4.
    a1, a2, target_modules: the Kronecker factors (A is a1 x a2) and the layers adapted.
    resolution: training image size (square, center-cropped); ``None`` means the UNet's native size.
    prior_preservation: add a class-prior loss on images the base model generates for ``class_prompt``.
    mixed_precision: "no" (float32), "fp16" or "bf16" autocast for the frozen model; factors stay float32.
    keep_intermediate: keep X @ B.T of every adapted layer for backward instead of recomputing it:
        slightly faster steps, but ~2% more activation memory than LoRA rank 4 (off: at or below LoRA's).
    checkpoint_every: save factors, optimizer and RNG state every N steps (0: only at the end).
    validation_every: also render validation images every N steps (0: only at the end).
    evaluate: score the adapter after training (``EvaluationRequest``): false, true or an object of its fields.
    method: "krona" (the Kronecker factors) or "lora" (PEFT LoRA of rank ``lora_rank``, alpha = rank so its
        update has scale 1, on the same target modules, trained by the same loop: the paper's baseline).
    """

    instance_prompt: str
    steps: int | None = None
    learning_rate: float = 1e-3
    a1: int = 64
    a2: int = 8
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    resolution: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 4
    seed: int = 0
    random_flip: bool = False
    prior_preservation: bool = False
    class_prompt: str | None = None
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    keep_intermediate: bool = False
    checkpoint_every: int = 0
    validation_prompt: str | None = None
    validation_every: int = 0
    num_validation_images: int = 2
    validation_steps: int = 25
    method: str = "krona"
    lora_rank: int = 4
    # params.evaluate: score the adapter after training (EvaluationRequest's fields, stored as a dict).
    evaluate: bool | dict[str, Any] = False

    def __post_init__(self) -> None:
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise ValueError("instance_prompt must be a non-empty string, e.g. 'a photo of sks dog'")
        for name in ("instance_prompt", "class_prompt", "validation_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if value is not None and len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} is limited to {MAX_PROMPT_CHARS} characters (got {len(value):,})")
            if value is not None and "\x00" in value:
                raise ValueError(f"{name} must not contain NUL characters")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, list | tuple):
            raise ValueError(f"target_modules must be a list of module names, got {type(targets).__name__}")
        if len(targets) > MAX_TARGET_MODULES:
            raise ValueError(f"target_modules: at most {MAX_TARGET_MODULES} entries, got {len(targets)}")
        if not all(isinstance(t, str) for t in targets):
            raise ValueError("target_modules entries must be strings (module names such as 'to_q')")
        if any(len(t) > MAX_TARGET_MODULE_CHARS for t in targets):
            raise ValueError(f"target_modules entries are limited to {MAX_TARGET_MODULE_CHARS} characters")
        object.__setattr__(self, "target_modules", tuple(targets))
        _check_int("steps", self.steps, 1, 100_000, optional=True)
        _check_int("resolution", self.resolution, 64, 4096, optional=True)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        _check_int("batch_size", self.batch_size, 1, 64)
        _check_int("gradient_accumulation", self.gradient_accumulation, 1, 1024)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("num_class_images", self.num_class_images, 1, 10_000)
        _check_int("checkpoint_every", self.checkpoint_every, 0, 100_000)
        _check_int("validation_every", self.validation_every, 0, 100_000)
        _check_int("num_validation_images", self.num_validation_images, 1, 16)
        _check_int("validation_steps", self.validation_steps, 1, 1000)
        _check_int("lora_rank", self.lora_rank, 1, 1024)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_float("learning_rate", self.learning_rate, 0.0, 1.0, open_low=True)
        _check_float("prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        _check_float("adam_weight_decay", self.adam_weight_decay, 0.0, 10.0)
        _check_float("adam_epsilon", self.adam_epsilon, 0.0, 1.0, open_low=True)
        for name in ("adam_beta1", "adam_beta2"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, 0.0, 1e6, open_low=True)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.prior_preservation and not (self.class_prompt and self.class_prompt.strip()):
            raise ValueError("prior_preservation needs a class_prompt, e.g. 'a photo of a dog'")
        self.krona_config()  # a1/a2/target_modules validation
        request = self.evaluation()  # params.evaluate validation
        if request is not None:  # the words it reads off the instance prompt are client text too
            for name, word in zip(
                ("identifier", "class_noun"), request.subject_words(self.instance_prompt), strict=True
            ):
                if len(word) > 100 or not word.isprintable():
                    raise ValueError(
                        f"evaluate: the {name} read off the instance prompt must be printable and at most 100 "
                        f"characters; give evaluate.{name}"
                    )

    def evaluation(self) -> EvaluationRequest | None:
        """What ``evaluate`` asks for, or None."""
        return EvaluationRequest.parse(self.evaluate)

    def krona_config(self) -> KronaConfig:
        return KronaConfig(a1=self.a1, a2=self.a2, target_modules=self.target_modules)

    def resolved_steps(self, sdxl: bool) -> int:
        """``steps``, or the paper's default for the model family (500 SD, 1000 SDXL)."""
        if self.steps is not None:
            return self.steps
        return 1000 if sdxl else 500

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training parameters: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def _check_int(name: str, value: Any, low: int, high: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bound = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bound}{low}, {high}], got {value!r}")
