"""TrainingSpec: every knob of a DreamBooth-KronA run, validated before any work starts.

Torch-free: the gateway validates a request's params with it; the trainer runs it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from shared.krona import DEFAULT_TARGET_MODULES, KronaConfig

__all__ = [
    "CLIENT_PARAMS",
    "MAX_PROMPT_CHARS",
    "MAX_TARGET_MODULES",
    "MAX_TARGET_MODULE_CHARS",
    "METHODS",
    "MIXED_PRECISION",
    "EvaluationRequest",
    "InvalidSpec",
    "TrainingSpec",
    "describe_validation_error",
]

MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)
# "krona": DiffuseKronA factors (the product); "lora": PEFT LoRA on the same targets and loop, the paper's
# baseline, for comparisons (`krona train --method lora`; not a service parameter).
Method = Literal["krona", "lora"]
METHODS: tuple[str, ...] = get_args(Method)
# Caps on the free text a client sends in a training's params.
MAX_PROMPT_CHARS = 1000
MAX_TARGET_MODULES = 16
MAX_TARGET_MODULE_CHARS = 100
# The parameters a client may set in POST /v1/trainings' `params` (shared/schemas.py: TrainingParams is this
# subset of TrainingSpec); the rest of TrainingSpec is the worker's business (precision, checkpoints, etc.).
CLIENT_PARAMS = frozenset(
    {
        "steps",
        "learning_rate",
        "a1",
        "a2",
        "target_modules",
        "resolution",
        "seed",
        "prior_preservation",
        "class_prompt",
        "num_class_images",
        "prior_loss_weight",
        "random_flip",
        "gradient_accumulation",
        "validation_prompt",
        "evaluate",
    }
)

Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TARGET_MODULE_CHARS)]
Word = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class InvalidSpec(ValueError):
    """A training or evaluation parameter out of its type or bounds; the message names every one, on one line."""


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: ``steps: Input should be greater than or equal to 1 (got
    0); seed: Input should be a valid integer (got '7')``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("string_too_long", "too_long"):
            message += f" (got {len(error['input']):,})"
        elif error["type"] not in ("value_error", "missing", "extra_forbidden") and "input" in error:
            shown = repr(error["input"])
            message += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
        if error["type"] == "extra_forbidden":
            message = "unknown parameter"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


class _Strict(BaseModel):
    """Strict (no coercion: false is not a count, "2" is not a number), frozen, unknown fields refused; a bad
    value raises ``InvalidSpec`` (a ValueError) with every problem on one line."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidSpec(describe_validation_error(exc)) from None


class EvaluationRequest(_Strict):
    """How an adapter is scored (CLIP-I, CLIP-T, DINO; shared/eval): the first ``prompts`` of DreamBooth's
    evaluation prompts for the class, ``per_prompt`` images each (seeds 0..per_prompt-1), ``steps`` denoising
    steps. Kept small on purpose: the score is a check, not the paper's 25 x 4 protocol (use `krona eval`).
    The ``params`` of POST /v1/adapters/{id}/evaluations and a training's ``params.evaluate``."""

    prompts: int = Field(4, ge=1, le=25, description="the first N of DreamBooth's evaluation prompts for the class")
    per_prompt: int = Field(2, ge=1, le=4, description="images per prompt (seeds 0..per_prompt-1)")
    steps: int = Field(25, ge=1, le=100, description="denoising steps per image")
    class_noun: Word | None = Field(
        None, description="the subject's class ('dog'); default: the last word of the instance prompt"
    )
    identifier: Word | None = Field(
        None, description="the rare token ('sks'); default: the word before the class noun in the instance prompt"
    )

    @field_validator("class_noun", "identifier")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be a non-empty printable string of at most 100 characters")
        return value

    @classmethod
    def parse(cls, value: Any) -> EvaluationRequest | None:
        """``params.evaluate``: false/None (no evaluation), true (the defaults) or an object of the fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, EvaluationRequest):
            return value
        if not isinstance(value, dict):
            raise InvalidSpec('evaluate must be true, false or an object such as {"prompts": 4, "per_prompt": 2}')
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


class TrainingSpec(_Strict):
    """Hyperparameters of one fine-tune; the defaults are the paper's (DiffuseKronA scripts, SD 1.5/2.1).

    A strict pydantic model: the trainer runs it, the gateway validates a request's ``params`` with it, and the
    API's ``TrainingParams`` schema is its ``CLIENT_PARAMS`` subset (shared/schemas.py), so the three agree.
    """

    instance_prompt: Prompt = Field(description="the subject's prompt with its rare token, e.g. 'a photo of sks dog'")
    steps: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="optimizer steps (each of gradient_accumulation micro-batches); default: the paper's 500 for "
        "SD 1.x/2.x, 1000 for SDXL (the server caps them)",
    )
    learning_rate: float = Field(
        1e-3, gt=0, le=1, description="AdamW, constant (the paper: 1e-3; best fidelity/diversity near 6e-4)"
    )
    a1: int = Field(64, ge=1, le=65_536, description="rows of A (a1 x a2); GET /v1/capabilities lists those served")
    a2: int = Field(8, ge=1, le=65_536, description="columns of A")
    target_modules: tuple[ModuleName, ...] = Field(
        DEFAULT_TARGET_MODULES, max_length=MAX_TARGET_MODULES, description="attention projections to adapt"
    )
    resolution: int | None = Field(
        None, ge=64, le=4096, multiple_of=8, description="square training size; default: the model's native size"
    )
    batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation: int = Field(4, ge=1, le=1024, description="micro-batches per step (the tenant caps it)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    random_flip: bool = Field(False, description="flip training images horizontally at random")
    prior_preservation: bool = Field(False, description="add the class-prior loss on generated class images")
    class_prompt: Prompt | None = Field(None, description="needed with prior_preservation, e.g. 'a photo of a dog'")
    num_class_images: int = Field(50, ge=1, le=10_000, description="class images (the tenant caps them)")
    prior_loss_weight: float = Field(1.0, ge=0, le=100)
    adam_beta1: float = Field(0.9, ge=0, le=1)
    adam_beta2: float = Field(0.999, ge=0, le=1)
    adam_weight_decay: float = Field(1e-2, ge=0, le=10)
    adam_epsilon: float = Field(1e-8, gt=0, le=1)
    use_8bit_adam: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    mixed_precision: MixedPrecision = Field(
        "no", description="float32, or fp16/bf16 autocast for the frozen model; the factors stay float32"
    )
    gradient_checkpointing: bool = False
    keep_intermediate: bool = Field(
        False,
        description="keep X @ B.T of every adapted layer for backward instead of recomputing it: slightly faster "
        "steps, ~2% more activation memory than LoRA rank 4 (off: at or below LoRA's)",
    )
    checkpoint_every: int = Field(0, ge=0, le=100_000, description="save factors, optimizer and RNG every N steps")
    validation_prompt: Prompt | None = Field(None, description="render validation images of this prompt at the end")
    validation_every: int = Field(0, ge=0, le=100_000, description="also render them every N steps")
    num_validation_images: int = Field(2, ge=1, le=16)
    validation_steps: int = Field(25, ge=1, le=1000)
    method: Method = Field(
        "krona",
        description="'krona' (the Kronecker factors) or 'lora' (PEFT LoRA of rank lora_rank, alpha = rank, on the "
        "same targets and loop: the paper's baseline)",
    )
    lora_rank: int = Field(4, ge=1, le=1024)
    evaluate: bool | EvaluationRequest = Field(
        False, description="score the adapter after training: false, true (the defaults) or an object of its fields"
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        # One name given as a string is one module (as in KronaConfig), not its characters; JSON gives a list.
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value

    @field_validator("evaluate", mode="before")
    @classmethod
    def _evaluation(cls, value: Any) -> Any:
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        return EvaluationRequest.parse(value)

    @field_validator("instance_prompt", "class_prompt", "validation_prompt")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if not self.instance_prompt.strip():
            raise ValueError("instance_prompt must be a non-empty string, e.g. 'a photo of sks dog'")
        if self.prior_preservation and not (self.class_prompt and self.class_prompt.strip()):
            raise ValueError("prior_preservation needs a class_prompt, e.g. 'a photo of a dog'")
        self.krona_config()  # a1/a2/target_modules validation
        request = self.evaluation()
        if request is not None:  # the words it reads off the instance prompt are client text too
            for name, word in zip(
                ("identifier", "class_noun"), request.subject_words(self.instance_prompt), strict=True
            ):
                if len(word) > 100 or not word.isprintable():
                    raise ValueError(
                        f"evaluate: the {name} read off the instance prompt must be printable and at most 100 "
                        f"characters; give evaluate.{name}"
                    )
        return self

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
        """JSON-ready (lists, dicts): what a row's params, a checkpoint and an adapter file's metadata keep."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        return cls(**data)
