"""Finding target layers in a model, wrapping them, and moving adapter factors in and out."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .config import KronaConfig, check_factors_fit_shapes
from .convert import ArrayLibrary, pair_factors
from .keys import KRONA_A_SUFFIX, KRONA_B_SUFFIX, short_name
from .layer import KronaLinear

__all__ = [
    "adapter_state_dict",
    "check_factors_fit",
    "delete_adapter",
    "find_target_linears",
    "inject_adapter",
    "krona_layers",
    "load_adapter_state_dict",
    "merge_adapter",
    "replace_submodule",
    "set_active_adapters",
    "set_adapter_scale",
    "set_keep_intermediate",
    "unmerge_adapter",
]


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def krona_layers(model: nn.Module) -> dict[str, KronaLinear]:
    """Module path -> KronaLinear for every wrapped layer (paths as the unwrapped model names them)."""
    return {path: module for path, module in model.named_modules() if isinstance(module, KronaLinear)}


def find_target_linears(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Linear | KronaLinear]:
    """Module path -> nn.Linear (or KronaLinear already wrapping one) for every path matching a target.

    A target matches a module path equal to it or ending in ``.<target>``, so "to_q" and
    "attn2.to_k" both work. Raises ValueError for a target that matches no linear layer, listing
    the linear-layer names the model has.
    """
    found: dict[str, nn.Linear | KronaLinear] = {}
    used: set[str] = set()
    linear_names: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, KronaLinear):
            candidate: nn.Linear | KronaLinear = module
        elif isinstance(module, nn.Linear) and not path.endswith(".base_layer"):
            candidate = module
        else:
            continue
        linear_names.add(short_name(path))
        for target in target_modules:
            if _matches(path, target):
                found[path] = candidate
                used.add(target)
    missing = [t for t in target_modules if t not in used]
    if missing:
        raise ValueError(
            f"target module(s) {missing} match no nn.Linear in {type(model).__name__}; "
            f"linear layer names it has: {', '.join(sorted(linear_names)[:40])}"
        )
    return found


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (the wrapped layer's place)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def check_factors_fit(layers: Mapping[str, nn.Linear | KronaLinear], config: KronaConfig) -> None:
    """ValueError naming the first layer a1/a2 does not divide, and the values that divide every layer."""
    check_factors_fit_shapes({p: (m.out_features, m.in_features) for p, m in layers.items()}, config)


def inject_adapter(
    model: nn.Module,
    config: KronaConfig,
    name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Add adapter ``name`` to every target linear layer of ``model``; returns the wrapped module paths.

    Layers are wrapped in KronaLinear once (a second adapter reuses the wrapper). All factor sizes
    are checked before anything changes, so a bad config leaves the model untouched. Only the new
    factors require grad; the caller decides what else is frozen. ``dtype`` defaults to each base
    weight's dtype (train with float32 factors on a half-precision base).
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    layers = find_target_linears(model, config.target_modules)
    check_factors_fit(layers, config)
    existing = [p for p, m in layers.items() if isinstance(m, KronaLinear) and name in m.krona_a]
    if existing:
        raise ValueError(f"adapter {name!r} already exists on {existing[0]}; delete it or pick another name")
    paths = sorted(layers)
    for path in paths:
        module = layers[path]
        wrapper = module if isinstance(module, KronaLinear) else KronaLinear(module)
        wrapper.add_adapter(
            name,
            (config.a1, config.a2),
            scale=config.scale,
            init_std=config.init_std,
            dtype=dtype,
            module_path=path,
            generator=generator,
        )
        if wrapper is not module:
            replace_submodule(model, path, wrapper)
    return paths


def _layers_with(model: nn.Module, name: str) -> dict[str, KronaLinear]:
    layers = {p: m for p, m in krona_layers(model).items() if name in m.krona_a}
    if not layers:
        have = sorted({n for m in krona_layers(model).values() for n in m.krona_a})
        raise KeyError(f"model has no adapter named {name!r}; adapters present: {have or 'none'}")
    return layers


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Factors of adapter ``name``: ``<module path>.krona_a`` (a1 x a2) and ``.krona_b`` (b1 x b2), detached copies."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in sorted(_layers_with(model, name).items()):
        state[path + KRONA_A_SUFFIX] = layer.krona_a[name].detach().clone()
        state[path + KRONA_B_SUFFIX] = layer.krona_b[name].detach().clone()
    return state


TORCH = ArrayLibrary(
    is_array=lambda x: isinstance(x, torch.Tensor),
    dtype_name=lambda t: str(t.dtype).removeprefix("torch."),
    all_finite=lambda t: t.device.type == "meta" or bool(torch.isfinite(t).all()),
)


def group_factors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B); checks that every path has both factors, 2-D, floating and finite.

    The same check (and messages) as the gateway's numpy one: ``convert.pair_factors`` read with torch.
    """
    return pair_factors(state_dict, TORCH)


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    name: str = "default",
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Copy factors into adapter ``name``; returns the module paths loaded.

    If the model already has adapter ``name``, the state dict must cover exactly its layers with
    the same shapes. Otherwise the adapter is created on the layers the state dict names, with the
    factor shapes it holds (so a file whose shapes differ per layer, like many LyCORIS exports,
    loads as is). Everything is checked before anything is written.
    """
    pairs = group_factors(state_dict)
    modules = dict(model.named_modules())
    existing = {p: m for p, m in krona_layers(model).items() if name in m.krona_a}
    if existing:
        extra = sorted(set(pairs) - set(existing))
        missing = sorted(set(existing) - set(pairs))
        if extra or missing:
            raise ValueError(
                f"state dict does not match adapter {name!r}: "
                f"{len(missing)} of its layers missing (e.g. {missing[:2]}), "
                f"{len(extra)} unknown layers (e.g. {extra[:2]})"
            )
    for path, (a, b) in pairs.items():
        module = modules.get(path)
        if not isinstance(module, nn.Linear | KronaLinear):
            raise ValueError(f"state dict names {path}, which is not a linear layer of {type(model).__name__}")
        (a1, a2), (b1, b2) = a.shape, b.shape
        if a1 * b1 != module.out_features or a2 * b2 != module.in_features:
            raise ValueError(
                f"factor shapes A {tuple(a.shape)} ⊗ B {tuple(b.shape)} give a {a1 * b1}x{a2 * b2} update, "
                f"but {path} is {module.out_features}x{module.in_features}"
            )
        if path in existing and (
            existing[path].krona_a[name].shape != a.shape or existing[path].krona_b[name].shape != b.shape
        ):
            have_a, have_b = existing[path].krona_a[name].shape, existing[path].krona_b[name].shape
            raise ValueError(
                f"{path}: adapter {name!r} has A {tuple(have_a)}, B {tuple(have_b)} "
                f"but the state dict has A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
    for path, (a, b) in sorted(pairs.items()):
        module = modules[path]
        if isinstance(module, KronaLinear) and name in module.krona_a:
            if name in module.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged on {path}; unmerge before loading new factors")
            module.krona_a[name].copy_(a)
            module.krona_b[name].copy_(b)
            continue
        wrapper = module if isinstance(module, KronaLinear) else KronaLinear(module)
        wrapper.add_adapter(name, (a.shape[0], a.shape[1]), scale=scale, dtype=dtype or a.dtype, module_path=path)
        wrapper.krona_a[name].copy_(a)
        wrapper.krona_b[name].copy_(b)
        if wrapper is not module:
            replace_submodule(model, path, wrapper)
    return sorted(pairs)


def set_adapter_scale(model: nn.Module, scale: float, name: str = "default") -> None:
    """Set the inference scale of adapter ``name`` on every layer (0 turns it off)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    for path, layer in _layers_with(model, name).items():
        if name in layer.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged on {path}; unmerge it before changing its scale")
        layer.scales[name] = float(scale)


def set_keep_intermediate(model: nn.Module, keep: bool) -> None:
    """Trade speed for memory in training: False recomputes X @ B.T in backward on every wrapped layer."""
    for layer in krona_layers(model).values():
        layer.keep_intermediate = bool(keep)


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    """Make exactly ``names`` active on every wrapped layer (an empty list runs the base model)."""
    names = [names] if isinstance(names, str) else list(names)
    layers = krona_layers(model)
    known = {n for m in layers.values() for n in m.krona_a}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; adapters present: {sorted(known) or 'none'}")
    for layer in layers.values():
        layer.active_adapters = [n for n in names if n in layer.krona_a]


def merge_adapter(model: nn.Module, name: str = "default") -> None:
    """Fuse adapter ``name`` into the base weights (W += scale * A ⊗ B) on every layer.

    Sums are computed in the wider of the weight's dtype and float32 and rounded once (see
    KronaLinear.merge): on a float64 model the merged output equals the factored one to ~1e-15
    relative; in float16/bfloat16 each merged weight is within half an ulp of the exact sum. Each
    layer keeps a copy of its unmerged weight until unmerged (memory: one more copy of the adapted
    weights, 178 MiB for SD 1.5's attention projections in float16, 1.8 GiB for SDXL's), so that
    ``unmerge_adapter`` restores the weights bit for bit. Each layer checks its result for NaN/inf
    before writing; on a failure the layers merged so far are unmerged again, so the model is never
    left half merged.
    """
    done: list[KronaLinear] = []
    try:
        for _, layer in sorted(_layers_with(model, name).items()):
            layer.merge(name)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge(name)
        raise


def unmerge_adapter(model: nn.Module, name: str = "default") -> None:
    """Undo merge_adapter exactly: each layer's weight is restored bit for bit (other merged adapters stay)."""
    for _, layer in sorted(_layers_with(model, name).items()):
        layer.unmerge(name)


def delete_adapter(model: nn.Module, name: str = "default") -> None:
    """Remove adapter ``name`` everywhere; a layer left with no adapter is unwrapped back to its nn.Linear."""
    for path, layer in _layers_with(model, name).items():
        layer.delete_adapter(name)
        if not layer.krona_a:
            replace_submodule(model, path, layer.base_layer)
