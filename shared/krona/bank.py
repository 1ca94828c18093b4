"""Adapter slots for inference: many adapters resident at once, chosen per sample of a batch.

``KronaBankLinear`` wraps a frozen ``nn.Linear`` with a bank of K pre-allocated factor slots
(``bank_a`` (K, a1, a2), ``bank_b`` (K, b1, b2)); slot 0 stays zero ("no adapter"). Switching an
adapter is a copy into a slot; nothing is allocated or replaced per request. Every layer reads the
same ``Routing``: which slot and which scale each sample of the current batch uses. With one slot for
the whole batch it runs the plain factored product; with several it runs batched products with
per-sample factors, so requests for different adapters share one UNet forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .functional import kron_delta
from .layer import WrapsLinear

__all__ = ["KronaBankLinear", "Routing", "kron_delta_per_sample"]


@dataclass
class Routing:
    """Per-sample slot indices and scales for the next forward passes (set by the engine)."""

    slots: torch.Tensor | None = None  # (batch,) long
    scales: torch.Tensor | None = None  # (batch,) float
    uniform_slot: int | None = None  # set when every sample uses the same slot and scale
    uniform_scale: float = 1.0

    def clear(self) -> None:
        self.slots = self.scales = None
        self.uniform_slot = None


@torch.no_grad()
def kron_delta_per_sample(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ-free batched (A_i ⊗ B_i) x_i: x (n, t, a2*b2), a (n, a1, a2), b (n, b1, b2) -> (n, t, a1*b1)."""
    n, t, _ = x.shape
    a1, a2 = a.shape[1:]
    b1, b2 = b.shape[1:]
    z = torch.bmm(x.reshape(n, t * a2, b2), b.transpose(1, 2))  # (n, t*a2, b1)
    y = torch.matmul(a.unsqueeze(1), z.view(n, t, a2, b1))  # (n, 1, a1, a2) @ (n, t, a2, b1) -> (n, t, a1, b1)
    return y.reshape(n, t, a1 * b1)


class KronaBankLinear(WrapsLinear):
    def __init__(
        self,
        base_layer: nn.Linear,
        a_shape: tuple[int, int],
        num_slots: int,
        routing: Routing,
        storage: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``storage``: optional (bank_a, bank_b) views into a bank shared by all layers (one copy per swap)."""
        super().__init__()
        a1, a2 = a_shape
        d_out, d_in = base_layer.out_features, base_layer.in_features
        if d_out % a1 or d_in % a2:
            raise ValueError(f"A {a_shape} does not fit a {d_out}x{d_in} layer")
        self.base_layer = base_layer
        weight = base_layer.weight
        if storage is None:
            storage = (
                torch.zeros(num_slots, a1, a2, dtype=weight.dtype, device=weight.device),
                torch.zeros(num_slots, d_out // a1, d_in // a2, dtype=weight.dtype, device=weight.device),
            )
        # Not persistent: the slots are serving state, not part of the model's weights.
        self.register_buffer("bank_a", storage[0], persistent=False)
        self.register_buffer("bank_b", storage[1], persistent=False)
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.routing
        if routing.uniform_slot is not None:
            if routing.uniform_slot == 0 or routing.uniform_scale == 0.0:
                return out
            slot = routing.uniform_slot
            delta = kron_delta(x.to(self.bank_a.dtype), self.bank_a[slot], self.bank_b[slot])
            return out + (delta * routing.uniform_scale).to(out.dtype)
        if routing.slots is None:
            return out
        slots = routing.slots
        if slots.shape[0] != x.shape[0]:
            raise RuntimeError(f"routing has {slots.shape[0]} samples but the batch has {x.shape[0]}")
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
        delta = kron_delta_per_sample(x3.to(self.bank_a.dtype), self.bank_a[slots], self.bank_b[slots])
        delta = delta * routing.scales.to(delta.dtype).view(-1, 1, 1)
        delta = delta.reshape(out.shape)
        return out + delta.to(out.dtype)
