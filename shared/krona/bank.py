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
    """Per-sample slot indices and scales for the next forward passes (set by the engine through ``uniform``,
    ``mixed`` and ``clear``).

    ``mode`` is "off" (no adapter: the base layer alone), "uniform" (one slot and scale for the whole batch) or
    "mixed" (``slots``/``scales`` per sample). A compiled UNet reads only ``mode`` and tensors: the uniform slot
    and scale also live in one-element tensors updated in place, since ``torch.compile`` specializes a graph on
    every Python number it reads (a recompile per slot index and scale), not on a tensor's values. Eager forwards
    read the Python numbers (an index into the bank is a view; a tensor index would copy the factors).
    """

    mode: str = "off"
    slots: torch.Tensor | None = None  # (batch,) long, "mixed"
    scales: torch.Tensor | None = None  # (batch,) float, "mixed"
    uniform_slot: int = 0
    uniform_scale: float = 0.0
    slot_tensor: torch.Tensor | None = None  # (1,) long: uniform_slot, for compiled graphs
    scale_tensor: torch.Tensor | None = None  # (1,) float32: uniform_scale, for compiled graphs

    def clear(self) -> None:
        self.mode = "off"
        self.slots = self.scales = None

    def uniform(self, slot: int, scale: float, device: torch.device | str = "cpu") -> None:
        """Every sample uses ``slot`` at ``scale`` (slot 0 or scale 0: no adapter)."""
        self.slots = self.scales = None
        if slot == 0 or scale == 0.0:
            self.mode = "off"
            return
        self.mode, self.uniform_slot, self.uniform_scale = "uniform", int(slot), float(scale)
        device = torch.device(device)
        if self.slot_tensor is None or self.slot_tensor.device != device:
            self.slot_tensor = torch.zeros(1, dtype=torch.long, device=device)
            self.scale_tensor = torch.zeros(1, dtype=torch.float32, device=device)
        self.slot_tensor.fill_(int(slot))
        self.scale_tensor.fill_(float(scale))

    def mixed(self, slots: torch.Tensor, scales: torch.Tensor) -> None:
        """Sample i uses ``slots[i]`` at ``scales[i]``."""
        self.mode, self.slots, self.scales = "mixed", slots, scales


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
        mode = routing.mode
        if mode == "off":
            return out
        if mode == "uniform":
            if torch.compiler.is_compiling():  # tensors: another slot or scale is another input, not another graph
                slot = routing.slot_tensor
                a, b = self.bank_a.index_select(0, slot)[0], self.bank_b.index_select(0, slot)[0]
                delta = kron_delta(x.to(self.bank_a.dtype), a, b)
                return out + (delta * routing.scale_tensor.to(delta.dtype)).to(out.dtype)
            slot = routing.uniform_slot
            delta = kron_delta(x.to(self.bank_a.dtype), self.bank_a[slot], self.bank_b[slot])
            return out + (delta * routing.uniform_scale).to(out.dtype)
        slots = routing.slots
        if slots.shape[0] != x.shape[0]:
            raise RuntimeError(f"routing has {slots.shape[0]} samples but the batch has {x.shape[0]}")
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
        delta = kron_delta_per_sample(x3.to(self.bank_a.dtype), self.bank_a[slots], self.bank_b[slots])
        delta = delta * routing.scales.to(delta.dtype).view(-1, 1, 1)
        delta = delta.reshape(out.shape)
        return out + delta.to(out.dtype)
