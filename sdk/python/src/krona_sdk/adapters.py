"""Krona adapters in your own process: load one into a diffusers pipeline, merge it, convert it to and from the
kohya/LyCORIS LoKr format. Needs the ``adapters`` extra (torch, safetensors, numpy); diffusers is yours.

The code is the service's own adapter library (``shared/krona`` in the Krona repository, shipped in this package
as ``krona_sdk._krona``), so a file the service wrote loads here exactly as the service loads it.

>>> from diffusers import StableDiffusionPipeline
>>> from krona_sdk.adapters import load_into_pipeline
>>> pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> load_into_pipeline(pipe, "adp_0a1b.krona.safetensors", scale=1.0)   # or an https URL, or "owner/repo/file"
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    from ._krona import (
        KronaConfig,
        LyCORISCompatibilityWarning,
        adapter_state_dict,
        from_lycoris,
        inject_adapter,
        load_adapter,
        save_adapter,
        set_adapter_scale,
        to_lycoris,
    )
    from ._krona import load_into_pipeline as _load_into_pipeline
    from ._krona import merge_adapter as _merge_adapter
    from ._krona import unmerge_adapter as _unmerge_adapter
except ImportError as exc:  # pragma: no cover - without the extra
    needs = "krona_sdk.adapters needs torch, safetensors and numpy: pip install 'krona-sdk[adapters]'"
    raise ImportError(f"{needs} ({exc})") from exc

__all__ = [
    "KronaConfig",
    "adapter_state_dict",
    "export_lycoris",
    "from_lycoris",
    "import_lycoris",
    "inject_adapter",
    "load_adapter",
    "load_into_pipeline",
    "merge",
    "resolve_adapter",
    "save_adapter",
    "set_adapter_scale",
    "to_lycoris",
    "unmerge",
]

# owner/repo or owner/repo/path/in/repo.safetensors (Hugging Face Hub names: letters, digits, - _ .)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>.+\.safetensors))?$")
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024  # the adapter size cap of the service


def _cache_dir() -> Path:
    root = os.environ.get("KRONA_SDK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "krona_sdk"
    )
    return Path(root) / "adapters"


def _download(url: str, headers: Mapping[str, str] | None) -> Path:
    """Download ``url`` once into the cache (keyed by the URL); the cached file afterwards."""
    import httpx

    target = _cache_dir() / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".safetensors")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with httpx.stream("GET", url, headers=dict(headers or {}), follow_redirects=True, timeout=60.0) as response:
        if response.status_code != 200:
            raise OSError(f"cannot download {url}: HTTP {response.status_code}")
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as part:
            try:
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise OSError(f"{url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MiB; not an adapter")
                    part.write(chunk)
            except BaseException:
                os.unlink(part.name)
                raise
    os.replace(part.name, target)
    return target


def _from_hub(repo_id: str, filename: str | None, revision: str | None) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"{repo_id!r} looks like a Hugging Face Hub id; install huggingface_hub to download it, or give a path"
        ) from None
    if filename is None:
        files = [f for f in huggingface_hub.list_repo_files(repo_id, revision=revision) if f.endswith(".safetensors")]
        if len(files) != 1:
            listed = ", ".join(files) if files else "none"
            raise ValueError(f"{repo_id} has {len(files)} .safetensors files ({listed}); name one: {repo_id}/FILE")
        filename = files[0]
    return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))


def resolve_adapter(
    source: str | os.PathLike, *, headers: Mapping[str, str] | None = None, revision: str | None = None
) -> Path:
    """A local path for ``source``: a file path as it is; an http(s) URL downloaded once into
    ``~/.cache/krona_sdk/adapters`` (``headers``, e.g. ``Authorization``, are sent with it); a Hugging Face Hub
    id ``owner/repo`` (its only .safetensors file) or ``owner/repo/path/file.safetensors`` through huggingface_hub.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text.startswith(("http://", "https://")):
        return _download(text, headers)
    match = HUB_ID.match(text)
    if match and not path.exists() and not text.startswith((".", "/", "~")):
        return _from_hub(match["repo"], match["file"], revision)
    raise FileNotFoundError(f"no adapter file {text} (a path, an http(s) URL or a Hub id owner/repo[/file])")


def load_into_pipeline(
    pipe: Any,
    source: str | os.PathLike,
    scale: float = 1.0,
    name: str = "default",
    *,
    headers: Mapping[str, str] | None = None,
    revision: str | None = None,
) -> list[str]:
    """Put a native Krona or LyCORIS LoKr adapter on ``pipe.unet`` (any diffusers UNet pipeline: SD 1.x/2.x, SDXL)
    as adapter ``name`` at ``scale``; ``source`` as in ``resolve_adapter``. Returns the UNet paths adapted; an
    adapter of the same name is replaced. Each adapted layer computes (A ⊗ B) x without building A ⊗ B."""
    return _load_into_pipeline(pipe, resolve_adapter(source, headers=headers, revision=revision), scale, name)


def _unet(pipe_or_model: Any) -> Any:
    return getattr(pipe_or_model, "unet", pipe_or_model)


def merge(pipe_or_model: Any, name: str = "default") -> None:
    """Fuse adapter ``name`` into the weights (W += scale · A ⊗ B): no extra cost per step; ``unmerge`` undoes it
    exactly. Takes a pipeline (its UNet) or a model."""
    _merge_adapter(_unet(pipe_or_model), name)


def unmerge(pipe_or_model: Any, name: str = "default") -> None:
    """Take a merged adapter back out of the weights."""
    _unmerge_adapter(_unet(pipe_or_model), name)


def export_lycoris(path: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write a native adapter file as kohya/LyCORIS LoKr (loads in ComfyUI, AUTOMATIC1111, Forge at scale 1).
    Returns the warnings about loaders that cannot rebuild these factor shapes (the lycoris-lora library)."""
    from safetensors.torch import save_file

    state_dict, _config, metadata = load_adapter(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LyCORISCompatibilityWarning)
        lokr = to_lycoris(state_dict)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": metadata.get("base_model", "")}
    save_file(lokr, target, metadata=meta)
    return [str(w.message) for w in caught]


def import_lycoris(path: str | os.PathLike, out: str | os.PathLike, base_model: str = "") -> Path:
    """Write a kohya/LyCORIS LoKr file (full or low-rank factors) as a native Krona adapter file."""
    from ._krona.io import read_safetensors
    from ._krona.keys import short_name
    from ._krona.model import group_factors

    tensors, _ = read_safetensors(path)
    state_dict = from_lycoris(tensors)
    pairs = group_factors(state_dict)
    shapes = [tuple(a.shape) for a, _ in pairs.values()]
    a1, a2 = max(set(shapes), key=shapes.count)  # for information: each layer keeps its own shapes
    config = KronaConfig(a1=a1, a2=a2, target_modules=tuple(sorted({short_name(p) for p in pairs})))
    return Path(save_adapter(out, state_dict, config, {"base_model": base_model, "created_by": "krona_sdk"}))
