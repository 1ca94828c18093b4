"""The DreamBooth evaluation prompts (25 for objects, 25 for live subjects) and the text CLIP-T scores.

The prompts ship as data (`prompts.json`, with its source and license): DreamBooth's dataset file
`prompts_and_classes.txt` (github.com/google/dreambooth, CC BY 4.0), the set DreamBooth and DiffuseKronA
report CLIP-I, CLIP-T and DINO on. Torch-free.

The identifier and class noun come from clients (``params.evaluate``, or words of a training's instance prompt):
they are substituted into the trusted templates once, literally (``fill_template``), never used as a template
themselves. (They once went through ``str.format`` a second time, where an identifier such as
``{class_noun:>400000000}`` built a 400 MB string.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

PROMPT_SETS = ("default", "object", "live")
# The gateway caps evaluate.identifier / evaluate.class_noun at the same length (shared/training_spec.py).
MAX_SUBJECT_WORD_CHARS = 100
# In a template: the two fields, the escaped braces "{{" and "}}", or any other brace (an unknown field).
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: what the model is asked (`prompt`) and what CLIP-T compares its images to (`text`)."""

    prompt: str
    text: str


@cache
def prompt_data() -> dict[str, Any]:
    """`prompts.json`: `object` and `live` templates (with `{identifier}` and `{class_noun}`), `source`, `seeds`."""
    with resources.files(__package__).joinpath("prompts.json").open("r", encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def is_live_subject(class_noun: str) -> bool:
    """Whether DreamBooth evaluates `class_noun` with its live-subject prompts (its live subjects: dogs and cats)."""
    return class_noun.strip().lower() in prompt_data()["live_classes"]


def prompt_templates(prompts: str, class_noun: str) -> list[str]:
    """The templates of a prompt set: `default` (live prompts for a live class, object prompts otherwise),
    `object`, `live`, or a text file with one template per line (blank lines and `#` comments skipped).

    A template may hold `{identifier}` and `{class_noun}`; a line without them is taken as written.
    """
    if prompts == "default":
        prompts = "live" if is_live_subject(class_noun) else "object"
    if prompts in ("object", "live"):
        return list(prompt_data()[prompts])
    path = Path(prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {prompts!r} is neither {', '.join(PROMPT_SETS)} nor a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise ValueError(f"prompt file {path} has no prompts (one per line)")
    return templates


def clip_t_text(prompt: str, identifier: str, class_noun: str) -> str:
    """The prompt as CLIP-T reads it: the rare identifier means nothing to CLIP, so it is removed where the class
    noun follows ("a sks dog in the snow" → "a dog in the snow") and replaced by the class noun elsewhere
    ("a photo of sks" → "a photo of dog"), as DreamBooth and DiffuseKronA score text alignment.
    """
    if not identifier:
        return prompt
    # Lookarounds rather than \b, so identifiers such as "<new1>" match too.
    token = rf"(?<!\w){re.escape(identifier)}(?!\w)"
    noun = re.escape(class_noun)  # a prefix: "sks dogs" → "dogs"
    # "sks dog" → "dog"; then any identifier left alone → the class noun.
    text = re.sub(rf"{token}\s+(?={noun})", "", prompt) if class_noun else prompt
    text = re.sub(token, lambda _: class_noun, text)  # a function: backslashes in the noun are not escapes
    return " ".join(text.split())


def check_subject_word(name: str, value: str) -> str:
    """``value`` if it can stand in a prompt as the identifier or class noun: at most ``MAX_SUBJECT_WORD_CHARS``
    printable characters (no newline, tab or other control character); ValueError naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_SUBJECT_WORD_CHARS:
        raise ValueError(f"{name} is limited to {MAX_SUBJECT_WORD_CHARS} characters (got {len(value):,})")
    if not value.isprintable():
        raise ValueError(f"{name} must be printable text: no newlines, tabs or other control characters")
    return value


def fill_template(template: str, *, identifier: str, class_noun: str) -> str:
    """The template (trusted: a shipped set or the operator's file) with ``{identifier}`` and ``{class_noun}``
    replaced by the given text, literally and in one pass: braces in the values stay as they are and are never
    read as fields. ``{{`` and ``}}`` in the template are literal braces, as in ``str.format``; any other field
    is a ValueError."""
    values = {"{identifier}": identifier, "{class_noun}": class_noun, "{{": "{", "}}": "}"}

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token not in values:
            raise ValueError(
                f"prompt template {template!r} has an unknown field {token!r}; use {{identifier}} and {{class_noun}}"
            )
        return values[token]

    return _TEMPLATE_TOKEN.sub(replace, template)


def evaluation_prompts(
    prompts: str | Sequence[str] = "default", *, identifier: str = "sks", class_noun: str
) -> list[EvalPrompt]:
    """The prompts to generate from, filled in, each with its CLIP-T text. ``prompts``: a set name or a file
    (``prompt_templates``), or the templates themselves."""
    check_subject_word("the identifier", identifier)
    check_subject_word("the class noun", class_noun)
    if not class_noun.strip():
        raise ValueError("the class noun is empty; give the subject's class, e.g. --class-noun dog")
    templates = prompt_templates(prompts, class_noun) if isinstance(prompts, str) else list(prompts)
    if not templates:
        raise ValueError("no evaluation prompts")
    result = []
    for template in templates:
        prompt = fill_template(template, identifier=identifier, class_noun=class_noun)
        result.append(EvalPrompt(prompt=" ".join(prompt.split()), text=clip_t_text(prompt, identifier, class_noun)))
    return result


def image_seeds(per_prompt: int, base_seed: int = 0) -> list[int]:
    """The seeds of one prompt's images: image k gets `base_seed + k` (the same for every prompt)."""
    return [base_seed + k for k in range(per_prompt)]
