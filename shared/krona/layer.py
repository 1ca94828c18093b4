"""KronaLinear: an nn.Linear wrapper that adds Σ scale_k · (A_k ⊗ B_k) x for its active adapters."""

from __future__ import annotations

import torch
from torch import nn

from .config import check_divides
from .functional import kron_delta

__all__ = ["KronaLinear", "WrapsLinear"]


class WrapsLinear(nn.Module):
    """A module around a frozen ``base_layer`` (nn.Linear) that still looks like it to other code."""

    base_layer: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `module.weight` of the original Linear (diffusers does) keeps working.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class KronaLinear(WrapsLinear):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) and holds any number of named adapters.

    Each adapter ``name`` has factors ``krona_a[name]`` (a1 x a2) and ``krona_b[name]`` (b1 x b2) with
    a1*b1 = out_features and a2*b2 = in_features, and a scale. The forward pass is

        y = base_layer(x) + Σ_{name active, not merged} scale[name] * (A ⊗ B) x

    computed as A @ x.view(a2, b2) @ B.T per token (see functional.kron_delta); A ⊗ B is only built
    to merge an adapter into the base weight.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"KronaLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.krona_a = nn.ParameterDict()
        self.krona_b = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.active_adapters: list[str] = []
        # name -> the scale it was merged with, so that unmerge subtracts exactly what merge added.
        self.merged_adapters: dict[str, float] = {}
        # False: recompute X @ B.T in backward (less activation memory, one more GEMM); see kron_delta.
        self.keep_intermediate = True

    def add_adapter(
        self,
        name: str,
        a_shape: tuple[int, int],
        *,
        scale: float = 1.0,
        init_std: float | None = None,
        dtype: torch.dtype | None = None,
        module_path: str = "layer",
        generator: torch.Generator | None = None,
    ) -> None:
        """Create adapter ``name`` with A of shape a_shape: A ~ N(0, init_std or 1/a1), B = 0."""
        if name in self.krona_a:
            raise ValueError(f"adapter {name!r} already exists on {module_path}; remove it first")
        a1, a2 = a_shape
        check_divides(a1, a2, self.out_features, self.in_features, module_path)
        weight = self.base_layer.weight
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        device = weight.device
        a = torch.empty(a1, a2, dtype=dtype, device=device)
        if device.type != "meta":
            std = init_std if init_std is not None else 1.0 / a1
            # Sample in float32 on the CPU so that the same seed gives the same factors everywhere.
            a.copy_(torch.randn(a1, a2, generator=generator) * std)
        b = torch.zeros(self.out_features // a1, self.in_features // a2, dtype=dtype, device=device)
        self.krona_a[name] = nn.Parameter(a)
        self.krona_b[name] = nn.Parameter(b)
        self.scales[name] = float(scale)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if name in self.merged_adapters:
            self.unmerge(name)
        del self.krona_a[name]
        del self.krona_b[name]
        self.scales.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * (A ⊗ B) as a dense (out_features x in_features) tensor in float32; for merging and tests."""
        a = self.krona_a[name].float()
        b = self.krona_b[name].float()
        return self.scales[name] * torch.kron(a, b)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add scale * (A ⊗ B) into the base weight; refuses (and changes nothing) if the result is not finite."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged")
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight(name).to(weight.device)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is left unmerged")
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters[name] = self.scales[name]

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract what merge(name) added (with the scale used at merge time)."""
        if name not in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is not merged")
        weight = self.base_layer.weight
        a = self.krona_a[name].float()
        b = self.krona_b[name].float()
        delta = self.merged_adapters[name] * torch.kron(a, b)
        restored = weight.float() - delta.to(weight.device)
        if not torch.isfinite(restored).all():
            raise ValueError(f"unmerging adapter {name!r} gives non-finite weights; left merged")
        weight.copy_(restored.to(weight.dtype))
        del self.merged_adapters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside the base weight
            scale = self.scales[name]
            if scale == 0.0:
                continue
            a = self.krona_a[name]
            b = self.krona_b[name]
            # Under autocast the update runs in the autocast dtype, with autocast off inside so that
            # the hand-written backward sees one dtype; gradients still reach float32 factors.
            dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
            with torch.autocast(device_type, enabled=False):
                delta = kron_delta(x.to(dtype), a.to(dtype), b.to(dtype), keep_intermediate=self.keep_intermediate)
            out = out + (delta * scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        shapes = {n: (tuple(self.krona_a[n].shape), tuple(self.krona_b[n].shape)) for n in self.krona_a}
        return f"adapters={shapes}, active={self.active_adapters}, merged={list(self.merged_adapters)}"
