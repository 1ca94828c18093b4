"""Adapter files: safetensors with ``<module path>.krona_a/.krona_b`` tensors and string metadata."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import KronaConfig
from .convert import TORCH_DTYPE_SIZES, parse_safetensors_header, safetensors_header_length
from .keys import is_lokr_key
from .model import group_factors

__all__ = ["FORMAT", "MAX_ADAPTER_BYTES", "load_adapter", "save_adapter", "validate_state_dict"]

FORMAT = "krona/1"
# Adapters are a few MB (SDXL at (64, 4) is 3.9M parameters, 15.5 MB in float32); anything far
# larger is not an adapter and is refused before it is read into memory.
MAX_ADAPTER_BYTES = 256 * 1024 * 1024


def validate_state_dict(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Check keys, 2-D floating factors, A/B pairs and finiteness; ValueError with the first problem.

    The one check of native factors (``convert.pair_factors``), which the gateway runs on numpy arrays.
    """
    group_factors(state_dict)


def save_adapter(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    config: KronaConfig,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a native adapter file; returns its path.

    Metadata (all strings): ``format`` = "krona/1", ``config`` (JSON: a1, a2, targets, scale),
    ``base_model`` and ``created_by`` (from ``metadata`` if given, else ""), plus any other entries
    of ``metadata``. The file is written to a temporary name and renamed, so a crash never leaves a
    half-written adapter under the final name.
    """
    validate_state_dict(state_dict)
    meta = {"base_model": "", "created_by": "krona"}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise ValueError(f"metadata values must be strings; {key!r} is {type(value).__name__}")
        meta[key] = value
    meta["format"] = FORMAT
    meta["config"] = config.to_json()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of any safetensors file, with clear errors for size and format problems; the header is
    checked with the gateway's limits (``convert.parse_safetensors_header``) before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{path} is {size} bytes; adapter files are limited to {MAX_ADAPTER_BYTES} bytes")
    # The header is checked (length, tensor count, dtypes, offsets) before the safetensors library reads the file,
    # so that a crafted header is refused at once, as the gateway refuses it (convert.parse_safetensors_header).
    with open(path, "rb") as f:
        header_len = safetensors_header_length(f.read(8), size, str(path))
        header = f.read(header_len)
    parse_safetensors_header(header, size - 8 - header_len, str(path), dtype_sizes=TORCH_DTYPE_SIZES)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from None
    return tensors, metadata


def load_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], KronaConfig, dict[str, str]]:
    """Read a native adapter file: (state_dict, config, metadata); validated like save_adapter.

    A LyCORIS/kohya LoKr file is refused here with a pointer to ``from_lycoris``.
    """
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        if any(map(is_lokr_key, tensors)):
            raise ValueError(
                f"{path} is a LyCORIS LoKr file, not a native Krona adapter; "
                "convert it with shared.krona.from_lycoris or `krona import`"
            )
        raise ValueError(
            f"{path} is not a Krona adapter (metadata format is {metadata.get('format')!r}, want {FORMAT!r})"
        )
    if "config" not in metadata:
        raise ValueError(f"{path} has no 'config' metadata")
    config = KronaConfig.from_metadata(metadata["config"])
    validate_state_dict(tensors)
    return tensors, config, metadata
