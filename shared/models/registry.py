"""Base models by name: the built-in tiny models, a local diffusers folder, or a Hugging Face Hub id.

`unet_config` imports neither torch nor diffusers, builds nothing and writes nothing, so the gateway can
validate adapter factor sizes against a base model without loading it, with no writable home or cache: a
built-in tiny model's UNet config comes from its cached folder, or from `TINY_MODEL_CONFIGS` when no worker
has built it yet; a Hub id's from the Hugging Face cache, the bundled configs of the known ids, or the Hub
(shared/models/hub.py). `resolve_base_model` builds a built-in model that is not cached (that needs torch);
call it where the model will be loaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.models.hub import REMOVED_HUB_IDS, BaseModelNotFound, hub_unet_config, missing_model_message
from shared.models.tiny import TINY_MODELS, ensure_tiny_model, tiny_model_path, tiny_unet_config

logger = logging.getLogger("krona.models")

BUILTIN_MODELS: tuple[str, ...] = TINY_MODELS

# "org/name" as the Hub accepts it: word characters, "-" and "."; no leading "." or "-".
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def resolve_base_model(name_or_path: str | Path) -> str:
    """A local folder path or Hub id that `DiffusionPipeline.from_pretrained` can load.

    Built-in names (`tiny-sd`, `tiny-sdxl`) are built into the model cache on first use and resolve to
    that folder; a folder with `model_index.json` resolves to itself; a Hub-style id (`org/name`) that is
    not a local folder is returned unchanged (not looked up online). Anything else raises `ValueError`.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(ensure_tiny_model(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return str(path)
        raise ValueError(
            f"base model folder {name!r} has no model_index.json; give a diffusers pipeline folder "
            f"(saved with save_pretrained), a Hub id such as 'org/name', or one of the built-in models: "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    if path.exists():
        raise ValueError(
            f"base model {name!r} is a file (single-file checkpoints are not supported); give a diffusers "
            f"pipeline folder, a Hub id such as 'org/name', or one of the built-in models: "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    if _looks_like_hub_id(name):
        if name in REMOVED_HUB_IDS:  # it may still be in a pre-filled cache, so this is a warning, not an error
            logger.warning("%s", missing_model_message(name))
        return name
    raise ValueError(
        f"unknown base model {name!r}: it is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
        f"nor a local folder with model_index.json, nor a Hub id such as 'org/name'"
    )


def load_pipeline(name_or_path: str | Path, *, torch_dtype: Any = None, device: Any = None) -> Any:
    """Load a base model as a diffusers pipeline through `DiffusionPipeline.from_pretrained`.

    Hub ids go through the Hugging Face cache as usual (and stay offline when `HF_HUB_OFFLINE=1`).
    `torch_dtype` (e.g. `torch.float16`) and `device` (e.g. `"cuda"`) are applied when given.
    """
    # lazy: loads torch, diffusers, transformers, …
    from diffusers import DiffusionPipeline

    source = resolve_base_model(name_or_path)
    if str(name_or_path) in BUILTIN_MODELS:
        logger.warning("base model %s has random weights: generated images are noise", name_or_path)
    kwargs = {} if torch_dtype is None else {_dtype_keyword(): torch_dtype}
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as exc:
        if Path(source).is_dir():
            raise
        # A Hub id that is gone, gated or unreachable: say which, and where a removed model's copies are.
        raise BaseModelNotFound(missing_model_message(source, exc)) from exc
    if device is not None:
        pipeline = pipeline.to(device)
    return pipeline


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (huggingface/diffusers#14205) and warns
    # on the old name; 0.42 is the first release known here to take `dtype`, older ones need `torch_dtype`.
    from packaging.version import Version

    return "dtype" if Version(metadata.version("diffusers")) >= Version("0.42") else "torch_dtype"


def is_sdxl(pipe: Any) -> bool:
    """Whether `pipe` (a pipeline, or a UNet config dict from `unet_config`) is SDXL-shaped.

    SDXL's UNet is the one conditioned on pooled text and size ids ("text_time"); this also holds for
    SDXL's img2img/inpainting pipelines and for fine-tunes saved under other class names.
    """
    config = pipe if isinstance(pipe, Mapping) else pipe.unet.config
    return config.get("addition_embed_type") == "text_time"


def unet_config(name_or_path: str | Path) -> dict[str, Any]:
    """The base model's `unet/config.json` as a dict, read without loading any weights or building a model.

    A built-in tiny model that is not cached yet gives its config from `TINY_MODEL_CONFIGS` (the keys it
    leaves out take diffusers' defaults). A Hub id is read from the Hugging Face cache, else from the bundled
    configs of the known ids (`HUB_UNET_CONFIGS`), else fetched from the Hub (`hub_unet_config`); a missing
    one raises `BaseModelNotFound` naming the id and, for a removed one, its mirrors.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS and not (tiny_model_path(name) / "model_index.json").is_file():
        return tiny_unet_config(name)
    source = resolve_base_model(name_or_path)
    local = Path(source)
    if local.is_dir():
        config_path = local / "unet" / "config.json"
        if not config_path.is_file():
            raise ValueError(f"base model folder {source!r} has no unet/config.json")
    else:
        return hub_unet_config(source)
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    return config
