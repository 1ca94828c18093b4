"""Training parameters on the command line: one name for each, the API's (``--learning-rate`` is
``learning_rate`` in ``params`` and in ``TrainingSpec``), for `krona train` (local) and `krona trainings create`
(the service). The names of the previous release (--lr, --grad-accum, --flip, --targets) still work, unlisted."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["TRAINING_PARAMS", "add_training_options", "training_params"]


def _modules(text: str) -> list[str]:
    modules = [t.strip() for t in text.split(",") if t.strip()]
    if not modules:
        raise argparse.ArgumentTypeError("give module names, e.g. to_q,to_k,to_v,to_out.0")
    return modules


def _evaluate(text: str) -> Any:
    """--evaluate: true, false, or a JSON object of the evaluation's fields."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", ""):
        return True
    if lowered in ("false", "no", "0"):
        return False
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        message = f'expected true, false or a JSON object like {{"prompts": 4}}, got {text!r}'
        raise argparse.ArgumentTypeError(message) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected true, false or a JSON object")
    return value


# (API name, type (None: a switch), metavar, help, local default, old spellings)
TRAINING_PARAMS: list[tuple[str, Any, str | None, str, Any, tuple[str, ...]]] = [
    ("steps", int, "N", "optimizer steps (default: 500 for SD 1.x/2.x, 1000 for SDXL)", None, ()),
    (
        "learning_rate",
        float,
        "LR",
        "AdamW learning rate, constant (default 1e-3, the paper's; its ablation finds ~6e-4 best, overfitting above "
        "1e-3)",
        1e-3,
        ("--lr",),
    ),
    ("a1", int, "N", "rows of the factor A (default 64); A is a1 x a2, B (d_out/a1) x (d_in/a2)", 64, ()),
    ("a2", int, "N", "columns of the factor A (default 8)", 8, ()),
    (
        "target_modules",
        _modules,
        "NAMES",
        "comma-separated attention projections to adapt (default to_q,to_k,to_v,to_out.0)",
        ["to_q", "to_k", "to_v", "to_out.0"],
        ("--targets",),
    ),
    ("resolution", int, "PX", "training image size, resized and center-cropped (default: the model's native size)",
     None, ()),
    ("seed", int, "N", "random seed (default 0)", 0, ()),
    ("gradient_accumulation", int, "N", "micro-batches per optimizer step (default 4)", 4, ("--grad-accum",)),
    ("random_flip", None, None, "random horizontal flips of the photos", False, ("--flip",)),
    ("prior_preservation", None, None, "add a class-prior loss on images the base model generates", False, ()),
    ("class_prompt", str, "PROMPT", 'class prompt of --prior-preservation, e.g. "a photo of a dog"', None, ()),
    ("num_class_images", int, "N", "class images for --prior-preservation (default 50)", 50, ()),
    ("prior_loss_weight", float, "W", "weight of the class-prior loss (default 1)", 1.0, ()),
    ("validation_prompt", str, "PROMPT", "prompt of the validation images (default: the instance prompt)", None, ()),
]  # fmt: skip


def add_training_options(parser: argparse.ArgumentParser, *, local: bool) -> None:
    """The training parameters as options. ``local`` (krona train): with the trainer's defaults; otherwise None
    unless given, so that the server's defaults apply."""
    group = parser.add_argument_group("training parameters (the API's params)")
    for name, kind, metavar, help_text, default, old in TRAINING_PARAMS:
        flag = "--" + name.replace("_", "-")
        if kind is None:
            group.add_argument(flag, dest=name, action="store_true", default=False if local else None, help=help_text)
            for alias in old:
                group.add_argument(alias, dest=name, action="store_true", help=argparse.SUPPRESS)
            continue
        group.add_argument(
            flag, dest=name, type=kind, metavar=metavar, default=default if local else None, help=help_text
        )
        for alias in old:
            group.add_argument(alias, dest=name, type=kind, metavar=metavar, help=argparse.SUPPRESS)
    if not local:
        group.add_argument(
            "--evaluate",
            type=_evaluate,
            nargs="?",
            const=True,
            metavar="JSON",
            help='score the adapter after training (CLIP-I, CLIP-T, DINO): alone, or with {"prompts": 4, '
            '"per_prompt": 2, "steps": 25, "class_noun": "dog"}',
        )


def training_params(args: argparse.Namespace, base: str | None = None) -> dict[str, Any]:
    """``params`` of a training: the ``--params`` JSON, then every option given (options win)."""
    params: dict[str, Any] = {}
    if base:
        try:
            params = json.loads(base)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--params is not JSON ({exc.msg} at character {exc.pos}): {base}") from None
        if not isinstance(params, dict):
            raise ValueError("--params must be a JSON object, e.g. '{\"steps\": 200}'")
    for name, *_ in TRAINING_PARAMS:
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    if getattr(args, "evaluate", None) is not None:
        params["evaluate"] = args.evaluate
    return params
