"""Checkpoints for exact resume: factors, optimizer state, step, losses and the run's RNG state, written
atomically (``save_checkpoint``) and restored (``find_latest_checkpoint``, then ``load_checkpoint``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.krona import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from shared.training_spec import TrainingSpec

from .adapter import ADAPTER_NAME
from .components import Components
from .lora import load_lora_state_dict, lora_state_dict
from .step import TrainState

__all__ = ["CHECKPOINT_PREFIX", "find_latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"


def save_checkpoint(
    directory: str | os.PathLike, components: Components, spec: TrainingSpec, state: TrainState, *, keep: int = 2
) -> Path:
    """Write ``<directory>/checkpoint-<step>/`` atomically (temp folder, then rename); keep the newest ``keep``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        if spec.method == "lora":
            save_file(lora_state_dict(components), tmp / "lora.safetensors")
        else:
            factors = adapter_state_dict(components.unet, ADAPTER_NAME)
            metadata = {"base_model": components.base_model}
            save_adapter(tmp / "adapter.safetensors", factors, spec.krona_config(), metadata)
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"generator": state.generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        meta = {"step": state.step, "losses": state.losses, "spec": spec.to_dict(), "base_model": components.base_model}
        (tmp / "state.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``directory`` (or ``directory`` itself if it is one)."""
    root = Path(directory)
    if (root / "state.json").is_file():
        return root
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def load_checkpoint(path: str | os.PathLike, components: Components, spec: TrainingSpec, state: TrainState) -> None:
    """Restore factors, optimizer, step, losses and RNG; refuses a checkpoint made with other settings."""

    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    saved = TrainingSpec.from_dict(meta["spec"])
    ignore = {"steps", "checkpoint_every", "validation_every", "validation_prompt", "num_validation_images"}
    differing = sorted(k for k, v in spec.to_dict().items() if k not in ignore and saved.to_dict()[k] != v)
    if differing:
        raise ValueError(f"checkpoint {path} was made with different settings ({', '.join(differing)}); cannot resume")
    if spec.method == "lora":
        load_lora_state_dict(components, load_file(path / "lora.safetensors"))
    else:
        factors, _, _ = load_adapter(path / "adapter.safetensors")
        load_adapter_state_dict(components.unet, factors, ADAPTER_NAME)
    state.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    state.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    state.step = int(meta["step"])
    state.losses = list(meta["losses"])
