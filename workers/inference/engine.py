"""The resident inference engine: one base pipeline, adapter slots, a tiered adapter cache, mixed batches.

    engine = Engine(pipe, fetch=lambda adapter_id: bytes_of_its_file)
    images = engine.run([Request(prompt=..., adapter_id="adp_1", seed=1), Request(..., adapter_id="adp_2")])

- Every target layer is wrapped once, at construction, in a ``KronaBankLinear`` with ``slots`` factor
  slots (slot 0 = no adapter). Switching adapters copies factors into a slot: no module is created or
  replaced, and after warm-up nothing is allocated per swap (the slots' storage never moves).
- Cache tiers: device slots (LRU), host memory (LRU under a byte budget), then storage (``fetch``).
  Counters: ``stats()``.
- Mixed batches: requests with different adapters (and scales, and none) run in one UNet batch, each
  sample with its own factors; the result equals running each request alone (tests check).
- Merged mode: ``merge(adapter_id)`` fuses one adapter into the base weights for a worker dedicated to
  it (no per-token adapter cost); ``unmerge()`` restores the weights exactly (kept copies).
- Adapters may cover a subset of the target layers (a training with ``target_modules: ["to_q", "to_v"]``):
  the other layers' part of the slot holds zero factors, a no-op. Another A shape is refused
  (``AdapterShapeError``).
- Step-level joining (``workers/inference/loop.py``): ``DenoisingLoop(engine, ...)`` runs one denoising
  loop that requests join and leave between steps, each with its own seed, steps, guidance and adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shared.krona.bank import KronaBankLinear, Routing
from shared.krona.config import DEFAULT_TARGET_MODULES
from shared.krona.model import find_target_linears, group_factors, replace_submodule

__all__ = ["AdapterCache", "AdapterShapeError", "Engine", "Request"]


class AdapterShapeError(ValueError):
    """The adapter's factor shapes do not match the engine's slots."""


@dataclass(frozen=True)
class Request:
    prompt: str
    adapter_id: str | None = None
    adapter_scale: float = 1.0
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int = 0


@dataclass
class CacheStats:
    device_hits: int = 0
    host_hits: int = 0
    storage_fetches: int = 0
    device_evictions: int = 0
    host_evictions: int = 0


class AdapterCache:
    """Host tier: adapter id -> prepared factors on the CPU (LRU under ``host_budget_bytes``); misses go to ``fetch``.

    ``prepare`` turns a file's bytes into what the device tier copies from (the engine: one flat vector
    in its layer order) and its size in bytes.
    """

    def __init__(
        self, fetch: Callable[[str], bytes], host_budget_bytes: int, prepare: Callable[[str, bytes], tuple[object, int]]
    ) -> None:
        self.fetch = fetch
        self.prepare = prepare
        self.budget = host_budget_bytes
        self.entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()
        self.lock = threading.Lock()

    def get(self, adapter_id: str):
        with self.lock:
            if adapter_id in self.entries:
                self.entries.move_to_end(adapter_id)
                self.stats.host_hits += 1
                return self.entries[adapter_id][0]
        value, size = self.prepare(adapter_id, self.fetch(adapter_id))
        with self.lock:
            self.stats.storage_fetches += 1
            self.entries[adapter_id] = (value, size)
            self.bytes += size
            while self.bytes > self.budget and len(self.entries) > 1:
                _, (_, evicted) = self.entries.popitem(last=False)
                self.bytes -= evicted
                self.stats.host_evictions += 1
        return value

    def prefetch(self, adapter_ids: Sequence[str]) -> None:
        for adapter_id in adapter_ids:
            if adapter_id not in self.entries:
                self.get(adapter_id)

    def discard(self, adapter_id: str) -> None:
        with self.lock:
            entry = self.entries.pop(adapter_id, None)
            if entry is not None:
                self.bytes -= entry[1]


class Engine:
    def __init__(
        self,
        pipe,
        *,
        fetch: Callable[[str], bytes],
        a_shape: tuple[int, int] = (64, 8),
        target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
        slots: int = 8,
        host_budget_bytes: int = 512 * 1024 * 1024,
        max_batch: int = 8,
    ) -> None:
        if slots < 1:
            raise ValueError("the engine needs at least one adapter slot")
        self.pipe = pipe
        self.a_shape = a_shape
        self.max_batch = max_batch
        self.routing = Routing()
        self.layers: dict[str, KronaBankLinear] = {}
        targets = sorted(find_target_linears(pipe.unet, target_modules).items())
        a1, a2 = a_shape
        # One bank for all layers: slot k of every layer is a view into row k of `flat`, so loading an
        # adapter into a slot is a single copy of one contiguous vector.
        self.offsets: dict[str, tuple[int, int, tuple[int, int], tuple[int, int]]] = {}
        total = 0
        for path, linear in targets:
            d_out, d_in = linear.out_features, linear.in_features
            if d_out % a1 or d_in % a2:
                raise ValueError(f"engine factors A {a_shape} do not fit {path} ({d_out}x{d_in})")
            b_shape = (d_out // a1, d_in // a2)
            self.offsets[path] = (total, total + a1 * a2, a_shape, b_shape)
            total += a1 * a2 + b_shape[0] * b_shape[1]
        weight = targets[0][1].weight
        self.flat = torch.zeros(slots + 1, total, dtype=weight.dtype, device=weight.device)
        for path, linear in targets:
            start, middle, (a1_, a2_), (b1, b2) = self.offsets[path]
            bank_a = self.flat[:, start:middle].view(slots + 1, a1_, a2_)
            bank_b = self.flat[:, middle : middle + b1 * b2].view(slots + 1, b1, b2)
            layer = KronaBankLinear(linear, a_shape, slots + 1, self.routing, storage=(bank_a, bank_b))
            replace_submodule(pipe.unet, path, layer)
            self.layers[path] = layer
        self.cache = AdapterCache(fetch, host_budget_bytes, self._prepare)
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # device tier: adapter id -> slot (LRU)
        self.free_slots = list(range(1, slots + 1))
        self.merged: tuple[str, float, dict[str, torch.Tensor]] | None = None
        self.lock = threading.Lock()

    # Device tier ---------------------------------------------------------------------------------

    def _prepare(self, adapter_id: str, data: bytes) -> tuple[torch.Tensor, int]:
        """File bytes -> one flat CPU vector in the engine's layer order (checked against the slots' shapes)."""
        # lazy: loads safetensors
        from safetensors.torch import load

        try:
            pairs = group_factors(load(data))
        except Exception as exc:  # not a native adapter file (safetensors' or our own check said why)
            raise AdapterShapeError(f"adapter {adapter_id} is not a readable adapter file: {exc}") from exc
        self._check(adapter_id, pairs)
        # A layer the adapter does not cover gets zero factors in its slot: a no-op there.
        flat = torch.zeros(self.flat.shape[1], dtype=self.flat.dtype)
        for path, (a, b) in pairs.items():
            start, middle, _, (b1, b2) = self.offsets[path]
            flat[start:middle] = a.reshape(-1).to(flat.dtype)
            flat[middle : middle + b1 * b2] = b.reshape(-1).to(flat.dtype)
        if self.flat.device.type == "cuda":
            flat = flat.pin_memory()  # so that the copy into the slot is one fast DMA
        return flat, flat.numel() * flat.element_size()

    def slot_for(self, adapter_id: str, pinned: set[int] = frozenset()) -> int:
        """The slot holding ``adapter_id``, loading it (host tier, then storage) into a free or LRU slot."""
        if adapter_id in self.slot_of:
            self.slot_of.move_to_end(adapter_id)
            self.cache.stats.device_hits += 1
            return self.slot_of[adapter_id]
        flat = self.cache.get(adapter_id)
        if self.free_slots:
            slot = self.free_slots.pop(0)
        else:
            victim = next((a for a, s in self.slot_of.items() if s not in pinned), None)
            if victim is None:
                raise RuntimeError("every slot is in use by the current batch; raise the slot count")
            slot = self.slot_of.pop(victim)
            self.cache.stats.device_evictions += 1
        self.flat[slot].copy_(flat, non_blocking=True)
        self.slot_of[adapter_id] = slot
        return slot

    def _factors(self, flat: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        start, middle, a_shape, (b1, b2) = self.offsets[path]
        return flat[start:middle].view(a_shape), flat[middle : middle + b1 * b2].view(b1, b2)

    def _check(self, adapter_id: str, pairs) -> None:
        """The adapter's layers must be among the engine's target layers (a subset is fine) with the slots' shapes."""
        extra = sorted(set(pairs) - set(self.offsets))
        if extra:
            raise AdapterShapeError(
                f"adapter {adapter_id} adapts layers this engine has no slots on ({len(extra)}, e.g. {extra[:2]}); "
                f"the engine's targets end in {', '.join(sorted({p.rsplit('.', 1)[-1] for p in self.offsets}))}"
            )
        for path, (a, b) in pairs.items():
            _, _, a_shape, b_shape = self.offsets[path]
            if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
                raise AdapterShapeError(
                    f"adapter {adapter_id} has A {tuple(a.shape)} on {path}; this engine's slots hold A {a_shape}"
                )

    def evict(self, adapter_id: str, pinned: set[int] = frozenset()) -> None:
        """Forget a deleted adapter: its slot is freed (unless a running request still uses it, in ``pinned``)
        and its host copy dropped."""
        with self.lock:
            slot = self.slot_of.get(adapter_id)
            if slot is not None and slot not in pinned:
                del self.slot_of[adapter_id]
                self.free_slots.append(slot)
        self.cache.discard(adapter_id)

    def stats(self) -> dict[str, int]:
        return dict(self.cache.stats.__dict__, device_resident=len(self.slot_of), host_bytes=self.cache.bytes)

    # Merged mode ---------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, adapter_id: str, scale: float = 1.0) -> None:
        """Fuse one adapter into the base weights (a worker dedicated to it); requests for it skip the slots."""
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged[0]} is merged; unmerge it first")
        flat = self.cache.get(adapter_id)
        originals = {}
        for path, layer in self.layers.items():
            weight = layer.base_layer.weight
            a, b = self._factors(flat, path)
            # In the wider of the weight's dtype and float32, rounded once; checked after rounding (a float16
            # overflow is an inf only then).
            compute = torch.promote_types(weight.dtype, torch.float32)
            delta = scale * torch.kron(a.to(compute), b.to(compute)).to(weight.device)
            merged = (weight.to(compute) + delta).to(weight.dtype)
            if not torch.isfinite(merged).all():
                for p, w in originals.items():
                    self.layers[p].base_layer.weight.copy_(w)
                raise ValueError(f"merging {adapter_id} gives non-finite weights")
            originals[path] = weight.detach().clone()
            weight.copy_(merged)
        self.merged = (adapter_id, scale, originals)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weights (the originals were kept, so half precision loses nothing)."""
        if self.merged is None:
            return
        for path, original in self.merged[2].items():
            self.layers[path].base_layer.weight.copy_(original)
        self.merged = None

    # Running requests ----------------------------------------------------------------------------

    def run(
        self,
        requests: Sequence[Request],
        *,
        steps: int = 25,
        guidance_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
    ) -> list[list]:
        """Images (numpy HWC float in [0, 1]) for each request, all in as few UNet batches as ``max_batch`` allows."""
        samples = [(i, r, k) for i, r in enumerate(requests) for k in range(r.num_images)]
        results: list[list] = [[] for _ in requests]
        with self.lock:
            for start in range(0, len(samples), self.max_batch):
                chunk = samples[start : start + self.max_batch]
                images = self._run_chunk(chunk, steps, guidance_scale, width, height)
                for (index, _, _), image in zip(chunk, images, strict=True):
                    results[index].append(image)
        return results

    def slot_and_scale(self, request: Request, pinned: set[int] = frozenset()) -> tuple[int, float]:
        """The slot and scale a request's samples run with (slot 0: no adapter, or the merged one), loading its
        adapter into a slot not in ``pinned`` (the slots of the requests running with it) when needed."""
        if request.adapter_id is None or request.adapter_scale == 0.0:
            return 0, 0.0
        if self.merged is not None:
            if request.adapter_id != self.merged[0]:
                raise ValueError(f"this engine serves merged adapter {self.merged[0]} only")
            if request.adapter_scale != self.merged[1]:
                raise ValueError("a merged adapter runs only at the scale it was merged with")
            return 0, 0.0
        return self.slot_for(request.adapter_id, pinned), float(request.adapter_scale)

    def can_host(self, adapter_id: str | None, pinned: set[int]) -> bool:
        """Whether a request for ``adapter_id`` can get a slot while the slots in ``pinned`` are in use."""
        if adapter_id is None or adapter_id in self.slot_of or self.free_slots:
            return True
        return any(slot not in pinned for slot in self.slot_of.values())

    def route(self, slots: Sequence[int], scales: Sequence[float]) -> None:
        """Set the slot and scale of every sample (UNet row) of the next forward passes."""
        device = self.flat.device
        if len(set(zip(slots, scales, strict=True))) == 1:
            self.routing.uniform(slots[0], scales[0], device)
        else:
            self.routing.mixed(torch.tensor(list(slots), device=device), torch.tensor(list(scales), device=device))

    def _run_chunk(self, chunk, steps, guidance_scale, width, height):
        pinned: set[int] = set()
        slots, scales = [], []
        for _, request, _ in chunk:
            slot, scale = self.slot_and_scale(request, pinned)
            pinned.add(slot)
            slots.append(slot)
            scales.append(scale)
        factor = 2 if guidance_scale > 1.0 else 1  # classifier-free guidance runs [uncond; cond] in one batch
        self.route(slots * factor, scales * factor)
        try:
            generators = [torch.Generator().manual_seed(r.seed + k) for _, r, k in chunk]
            negative = [r.negative_prompt or "" for _, r, _ in chunk]
            output = self.pipe(
                [r.prompt for _, r, _ in chunk],
                negative_prompt=negative if any(negative) else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                width=width,
                height=height,
                generator=generators,
                output_type="np",
            )
        finally:
            self.routing.clear()
        return list(output.images)
