"""Per-call overhead of the factored update against LoRA rank 4, by token count (issue 12, section 5).

    python benchmarks/adapter_overhead.py [--json PATH]

Forward + backward of the update alone on the cross-attention shape 768 -> 320 (A 64x8, B 5x96; LoRA
rank 4 on the same layer), median of 300 calls after 20 warm-up calls, from 1 token to 4928. Prints a
table: where the ratio falls with the token count, the gap at small shapes is a fixed cost per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.krona.functional import kron_delta

D_IN, D_OUT = 768, 320
TOKENS = (1, 8, 77, 308, 1232, 4928)


def _median_ms(fn, reps: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    a = torch.randn(64, 8, requires_grad=True)
    b = torch.randn(5, 96, requires_grad=True)
    lora_a = torch.randn(4, D_IN, requires_grad=True)
    lora_b = torch.randn(D_OUT, 4, requires_grad=True)
    rows = []
    print(f"# {torch.get_num_threads()} torch threads; forward + backward of the update alone, 768->320, A 64x8")
    print(f"{'tokens':>6} {'krona ms':>9} {'lora_r4 ms':>11} {'ratio':>6}")
    for tokens in TOKENS:
        x = torch.randn(tokens, D_IN, requires_grad=True)

        def krona(x: torch.Tensor = x) -> None:
            kron_delta(x, a, b).sum().backward()

        def lora(x: torch.Tensor = x) -> None:
            ((x @ lora_a.T) @ lora_b.T).sum().backward()

        row = {"tokens": tokens, "krona_ms": _median_ms(krona), "lora_r4_ms": _median_ms(lora)}
        row["ratio"] = row["krona_ms"] / row["lora_r4_ms"]
        rows.append(row)
        print(f"{tokens:>6} {row['krona_ms']:>9.3f} {row['lora_r4_ms']:>11.3f} {row['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
