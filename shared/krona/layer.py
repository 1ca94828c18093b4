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
        # name -> the scale it was merged with, in the order of merging.
        self.merged_adapters: dict[str, float] = {}
        # The base weight before the first merge, while any adapter is merged (see merge): a buffer so that
        # it follows .to(); not persistent, so that state dicts do not carry it.
        self.unmerged_weight: torch.Tensor | None
        self.register_buffer("unmerged_weight", None, persistent=False)
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

    def delta_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scale * (A ⊗ B) as a dense (out_features x in_features) tensor; for merging and tests.

        Computed in ``dtype``, by default the wider of the factors' dtype and float32.
        """
        a, b = self.krona_a[name], self.krona_b[name]
        dtype = dtype or torch.promote_types(a.dtype, torch.float32)
        return self.scales[name] * torch.kron(a.to(dtype), b.to(dtype))

    def _plus_update(self, weight: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        """weight + scale * (A ⊗ B), summed in the wider of the weight's dtype and float32, rounded once."""
        wide = torch.promote_types(weight.dtype, torch.float32)
        a = self.krona_a[name].to(device=weight.device, dtype=wide)
        b = self.krona_b[name].to(device=weight.device, dtype=wide)
        return (weight.to(wide) + scale * torch.kron(a, b)).to(weight.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add scale * (A ⊗ B) into the base weight; refuses (and changes nothing) if the result is not finite.

        The sum is computed in the wider of the weight's dtype and float32 (the compute dtype) and
        rounded once to the weight's dtype. With ΔW = scale * (A ⊗ B), u the unit roundoff of the
        weight's dtype (2^-11 float16, 2^-8 bfloat16, 2^-24 float32, 2^-53 float64) and u_c that of the
        compute dtype, each merged weight is within u |W + ΔW| + 4 u_c (|W| + |ΔW|) of the exact sum,
        and each output of the merged layer within 8 u Σ_j (|W| + |ΔW|)_ij |x_j| of the factored
        layer's (tests/test_merge_exact.py). On a whole model the roundings add up over the layers:
        on the tiny test UNet merged and factored outputs differ by at most 16 u of the largest output
        in float16 and bfloat16, and by 3e-15 of the largest output in float64.

        Memory: the first merge keeps a copy of the unmerged weight (``unmerged_weight``, out_features x
        in_features in the weight's dtype and on its device) until the last merged adapter is unmerged,
        so that unmerge restores it bit for bit. That doubles the memory of the merged layers' weights
        while merged: for all attention projections, 178 MiB (SD 1.5) or 1.8 GiB (SDXL) in float16.
        """
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged")
        weight = self.base_layer.weight
        merged = self._plus_update(weight, name, self.scales[name])
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is left unmerged")
        if self.unmerged_weight is None:
            self.unmerged_weight = weight.detach().clone()
        weight.copy_(merged)
        self.merged_adapters[name] = self.scales[name]

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight, exactly.

        The weight becomes the kept unmerged weight plus the other merged adapters, added again in the
        order they were merged (with the scales they were merged with): bit for bit what merging only
        those would have given, and the original weight once none is left. Changes made to the base
        weight while an adapter was merged are lost.
        """
        if name not in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is not merged")
        restored = self.unmerged_weight
        for other, scale in self.merged_adapters.items():
            if other != name:
                restored = self._plus_update(restored, other, scale)
        if not torch.isfinite(restored).all():
            raise ValueError(f"unmerging adapter {name!r} gives non-finite weights; left merged")
        self.base_layer.weight.copy_(restored)
        del self.merged_adapters[name]
        if not self.merged_adapters:
            self.unmerged_weight = None

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
