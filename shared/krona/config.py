"""KronaConfig: the adapter's hyperparameters, validated when built."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DEFAULT_TARGET_MODULES", "KronaConfig", "divisors"]

# The paper adapts the four attention projections of every attention block (self and cross).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending (used in error messages that say what would work)."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


@dataclass(frozen=True)
class KronaConfig:
    """Hyperparameters of a DiffuseKronA adapter: ΔW = A ⊗ B on each target linear layer.

    a1, a2: shape of A (a1 x a2). B is then (d_out / a1) x (d_in / a2) on each layer, so a1 must
        divide every target layer's output width and a2 every input width. The paper's scripts use
        (64, 8); larger a1*a2 means a smaller B and fewer parameters.
    target_modules: module names (or dotted suffixes of module paths) of the nn.Linear layers to adapt.
    scale: multiplier of ΔW at inference (no alpha/rank scaling in this method).
    init_std: standard deviation of A's normal init; None means 1/a1 (the paper's). B starts at zero,
        so a fresh adapter is a no-op.
    """

    a1: int = 64
    a2: int = 8
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    scale: float = 1.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        for name in ("a1", "a2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.init_std is not None and not (
            isinstance(self.init_std, int | float) and math.isfinite(self.init_std) and self.init_std > 0
        ):
            raise ValueError(f"init_std must be a positive number or None (meaning 1/a1), got {self.init_std!r}")

    def factor_shapes(
        self, d_out: int, d_in: int, module_path: str = "layer"
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of (A, B) for a d_out x d_in layer; a ValueError that lists valid choices if they do not divide."""
        check_divides(self.a1, self.a2, d_out, d_in, module_path)
        return (self.a1, self.a2), (d_out // self.a1, d_in // self.a2)

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-able form stored in adapter files (``targets`` is the file's name for target_modules)."""
        return {"a1": self.a1, "a2": self.a2, "targets": list(self.target_modules), "scale": self.scale}

    def to_json(self) -> str:
        return json.dumps(self.to_metadata(), sort_keys=True)

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any] | str) -> KronaConfig:
        """Inverse of to_metadata; also accepts ``target_modules`` and a JSON string."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ValueError(f"adapter config is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}")
        known = {"a1", "a2", "targets", "target_modules", "scale", "init_std"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter config fields: {sorted(unknown)}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {k: data[k] for k in ("a1", "a2", "scale", "init_std") if k in data}
        targets = data.get("targets", data.get("target_modules"))
        if targets is not None:
            kwargs["target_modules"] = tuple(targets) if not isinstance(targets, str) else (targets,)
        return cls(**kwargs)

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


def check_divides(a1: int, a2: int, d_out: int, d_in: int, module_path: str) -> None:
    """Raise a ValueError naming the layer and the valid choices when a1 ∤ d_out or a2 ∤ d_in."""
    if d_out % a1:
        raise ValueError(
            f"a1={a1} does not divide d_out={d_out} of {module_path}; use one of {', '.join(map(str, divisors(d_out)))}"
        )
    if d_in % a2:
        raise ValueError(
            f"a2={a2} does not divide d_in={d_in} of {module_path}; use one of {', '.join(map(str, divisors(d_in)))}"
        )


def check_factors_fit_shapes(shapes: Mapping[str, tuple[int, int]], config: KronaConfig) -> None:
    """ValueError naming the first layer (path -> (d_out, d_in)) that a1 or a2 does not divide, with the valid values.

    Torch-free: the gateway checks requests against shapes read from the base model's UNet config.
    """
    for index, (name, value) in enumerate((("a1", config.a1), ("a2", config.a2))):
        label = ("d_out", "d_in")[index]
        bad = [(path, dims[index]) for path, dims in shapes.items() if dims[index] % value]
        if bad:
            path, dim = bad[0]
            others = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
            valid = common_divisors(dims[index] for dims in shapes.values())
            raise ValueError(
                f"{name}={value} does not divide {label}={dim} of {path}{others}; "
                f"{name} values that divide every targeted layer: {', '.join(map(str, valid))}"
            )


def common_divisors(values: Iterable[int]) -> list[int]:
    """Divisors shared by all values (what a1 or a2 may be for a whole model)."""
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return divisors(g) if g else []
