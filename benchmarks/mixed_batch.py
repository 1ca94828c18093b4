"""Throughput of mixed-adapter batches: N requests with N different adapters in one UNet batch.

On a full-size SD 1.5 UNet (random weights, CPU), denoising steps of N samples (77 text tokens,
classifier-free guidance so 2N rows per UNet call) are timed four ways, interleaved round by round:

  mixed       one UNet batch, every sample with its own adapter (Krona engine routing)
  mixed_steps the same, and every request at its own timestep (a 1-D timestep tensor, one per row): what a
              step-level joined loop runs (workers/inference/loop.py), requests being at different steps
  single      one UNet batch, every sample with the same adapter (the best case any server has)
  sequential  N UNet calls of one sample each, swapping the adapter into the slot before each
              (what a server without mixed batching does for N different adapters)

Summary: mixed_to_single_throughput (goal ≥ 0.9), mixed_to_sequential_throughput,
mixed_steps_to_mixed_throughput (per-row timesteps should cost nothing: ≈ 1).

    python benchmarks/mixed_batch.py [--quick] [--json PATH] [--n 4] [--latent 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_swap import _krona_files, _pipeline_with_unet

from workers.inference.engine import Engine


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=4, 16x16 latents, 3 rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--n", type=int, help="requests per batch (default 4)")
    parser.add_argument("--latent", type=int, help="latent side (default 32 = 256 px; 16 with --quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; 3 with --quick)")
    args = parser.parse_args(argv)
    n = args.n or 4
    latent = args.latent or (16 if args.quick else 32)
    rounds = args.rounds or (3 if args.quick else 5)
    import tempfile

    pipe = _pipeline_with_unet("sd15")
    with tempfile.TemporaryDirectory() as tmp:
        files = _krona_files(pipe, n + 1, Path(tmp))
    engine = Engine(pipe, fetch=files.__getitem__, slots=n)
    unet = pipe.unet
    ids = sorted(files)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2 * n, 4, latent, latent, generator=g)
    states = torch.randn(2 * n, 77, 768, generator=g)
    t = torch.tensor([500])
    routing = engine.routing

    @torch.no_grad()
    def mixed():
        slots = [engine.slot_for(a) for a in ids[:n]]
        routing.mixed(torch.tensor(slots * 2), torch.ones(2 * n))
        unet(sample, t, encoder_hidden_states=states)
        routing.clear()

    # Each request at its own point of a 25-step schedule; [uncond; cond] rows of a request share its timestep.
    per_row = torch.tensor([960 - 40 * i for i in range(n)] * 2)

    @torch.no_grad()
    def mixed_steps():
        slots = [engine.slot_for(a) for a in ids[:n]]
        routing.mixed(torch.tensor(slots * 2), torch.ones(2 * n))
        unet(sample, per_row, encoder_hidden_states=states)
        routing.clear()

    @torch.no_grad()
    def single():
        routing.uniform(engine.slot_for(ids[0]), 1.0)
        unet(sample, t, encoder_hidden_states=states)
        routing.clear()

    @torch.no_grad()
    def sequential():
        # n + 1 adapters rotating through n slots: every call is a real swap.
        for i in range(n):
            sequential.k = (getattr(sequential, "k", -1) + 1) % len(ids)
            routing.uniform(engine.slot_for(ids[sequential.k]), 1.0)
            unet(sample[i::n][:2], t, encoder_hidden_states=states[i::n][:2])
        routing.clear()

    methods = {"mixed": mixed, "mixed_steps": mixed_steps, "single": single, "sequential": sequential}
    for fn in methods.values():
        fn()
    times = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = []
    print(f"# mixed_batch: SD 1.5 UNet, {n} requests x CFG, latent {latent}x{latent}, fastest of {rounds} rounds")
    print(f"{'method':<11} {'s/step':>8} {'samples/s':>10}")
    for name in methods:
        best = min(times[name])
        rows.append(
            {
                "method": name,
                "seconds": best,
                "median_seconds": statistics.median(times[name]),
                "samples_per_s": n / best,
            }
        )
        print(f"{name:<11} {best:>8.3f} {n / best:>10.2f}")
    by = {r["method"]: r for r in rows}
    summary = {
        "mixed_to_single_throughput": round(by["mixed"]["samples_per_s"] / by["single"]["samples_per_s"], 3),
        "mixed_to_sequential_throughput": round(by["mixed"]["samples_per_s"] / by["sequential"]["samples_per_s"], 3),
        "mixed_steps_to_mixed_throughput": round(by["mixed_steps"]["samples_per_s"] / by["mixed"]["samples_per_s"], 3),
    }
    print("summary:", json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "n": n,
            "latent": latent,
        }
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
