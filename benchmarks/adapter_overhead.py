"""Per-call overhead of the factored update against LoRA rank 4, by token count (issue 12 section 5, issue 24 item 5).

    python benchmarks/adapter_overhead.py [--json PATH] [--mode train|inference|both] [--variants krona,...]
                                          [--backend inductor] [--device cpu|cuda] [--dtype float32|bfloat16]
                                          [--reps 300] [--threads N]

The update alone on the cross-attention shape 768 -> 320 (A 64x8, B 5x96; LoRA rank 4 on the same layer), from 1
token to 4928: forward + backward (``train``) and the forward under no_grad (``inference``, what the engine runs);
median of ``--reps`` calls after 20 warm-up calls, the variants' calls interleaved round by round (in a rotating
order) so that machine noise hits all alike. Variants:

  krona                 shared.krona.functional.kron_delta as the layers run it (hand-written backward; under
                        no_grad, the same products without the autograd.Function)
  krona_function        inference only: the products inside the autograd.Function, as kron_delta ran them under
                        no_grad before it skipped the Function (issue 24 item 5)
  krona_autograd        the same products (X @ B.T, then one dense GEMM with A ⊗ I) under plain autograd:
                        fewer Python-side calls per step (the backward runs in autograd's C++ engine)
  krona_compiled        torch.compile(kron_delta) with ``--backend`` (inductor: generated kernels, fewer launches)
  krona_autograd_compiled  torch.compile of the autograd form
  krona_baseline        with --baseline REV: kron_delta of shared/krona/functional.py at that git revision (the
                        op before this issue's changes), for a before/after in the same run
  lora_r4               (x @ A.T) @ B.T under autograd
  lora_r4_compiled      torch.compile of it, for a fair comparison with the compiled variants
  krona_cudagraphs      on CUDA only: torch.compile(kron_delta, mode="reduce-overhead"), CUDA graphs replaying
  lora_r4_cudagraphs    the whole step's launches (the GPU's fixed cost per call is launches)

Every variant's output and gradients are checked against ``krona`` before timing (largest relative difference
in the JSON). Where the ratio to LoRA falls as the token count grows, the gap at small shapes is a fixed cost
per call. benchmarks/gpu_suite.py runs the same variants on a GPU in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.krona.functional import kron_delta

D_IN, D_OUT = 768, 320
A_SHAPE = (64, 8)
TOKENS = (1, 8, 77, 308, 1232, 4928)
CPU_VARIANTS = (
    "krona",
    "krona_autograd",
    "krona_compiled",
    "krona_autograd_compiled",
    "lora_r4",
    "lora_r4_compiled",
)
CUDA_VARIANTS = (*CPU_VARIANTS, "krona_cudagraphs", "lora_r4_cudagraphs")
INFERENCE_VARIANTS = ("krona", "krona_function", "krona_compiled", "lora_r4", "lora_r4_compiled")
CUDA_INFERENCE_VARIANTS = (*INFERENCE_VARIANTS, "krona_cudagraphs", "lora_r4_cudagraphs")


def kron_delta_autograd(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) x as kron_delta's B-first dense path computes it, X @ B.T then (A ⊗ I_b1), under plain autograd.

    x: (..., a2*b2); a: (a1, a2); b: (b1, b2) -> (..., a1*b1). Only for b1 small (kron_delta's dense path)."""
    a1, a2 = a.shape
    b1, b2 = b.shape
    lead = x.shape[:-1]
    n = x.numel() // (a2 * b2)
    z = x.reshape(n * a2, b2) @ b.t()  # (n*a2, b1)
    eye = torch.eye(b1, dtype=a.dtype, device=a.device)
    a_kron_eye = (a[:, None, :, None] * eye[None, :, None, :]).reshape(a1 * b1, a2 * b1)
    return (z.view(n, a2 * b1) @ a_kron_eye.t()).view(*lead, a1 * b1)


def load_baseline(revision: str):
    """kron_delta of shared/krona/functional.py at git ``revision``."""
    import subprocess
    import types

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{revision}:shared/krona/functional.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"functional_at_{revision}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{revision}:shared/krona/functional.py", "exec"), module.__dict__)
    return module.kron_delta


def make_variants(names, device: str, dtype: torch.dtype, backend: str, baseline=None) -> tuple[dict, dict]:
    """(name -> function of x giving the update, the parameters whose gradients are checked)."""
    g = torch.Generator().manual_seed(0)

    def param(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_(True)

    a, b = param(*A_SHAPE, std=1 / A_SHAPE[0]), param(D_OUT // A_SHAPE[0], D_IN // A_SHAPE[1], std=0.02)
    lora_a, lora_b = param(4, D_IN, std=0.02), param(D_OUT, 4, std=0.02)

    def krona(x):
        return kron_delta(x, a, b)

    def autograd_form(x):
        return kron_delta_autograd(x, a, b)

    def function_form(x):
        from shared.krona.functional import _KronDeltaBFirst

        a2, b2 = a.shape[1], b.shape[1]
        y = _KronDeltaBFirst.apply(x.reshape(-1, a2, b2), a, b, True)
        return y.reshape(*x.shape[:-1], -1)

    def lora(x):
        return (x @ lora_a.T) @ lora_b.T

    def compiled(fn, mode: str | None = None):
        # CUDA graphs come with inductor's own mode; the other compiled variants use ``backend``.
        return torch.compile(fn, mode=mode) if mode else torch.compile(fn, backend=backend)

    build = {
        "krona": lambda: krona,
        "krona_autograd": lambda: autograd_form,
        "krona_function": lambda: function_form,
        "krona_baseline": lambda: lambda x: baseline(x, a, b),
        "krona_compiled": lambda: compiled(krona),
        "krona_autograd_compiled": lambda: compiled(autograd_form),
        "lora_r4": lambda: lora,
        "lora_r4_compiled": lambda: compiled(lora),
        "krona_cudagraphs": lambda: compiled(krona, "reduce-overhead"),
        "lora_r4_cudagraphs": lambda: compiled(lora, "reduce-overhead"),
    }
    return {name: build[name]() for name in names}, {"krona": (a, b), "lora": (lora_a, lora_b)}


def _check(variants: dict, params: dict, x: torch.Tensor, train: bool) -> dict[str, float]:
    """Largest relative difference of each krona variant's output (and gradients, ``train``) from ``krona``'s."""

    def run(fn, grads):
        if not train:
            with torch.no_grad():
                return [fn(x).float()]
        for p in grads:
            p.grad = None
        xg = x.detach().clone().requires_grad_(True)
        out = fn(xg)
        out.float().sum().backward()
        return [t.detach().float().clone() for t in (out, xg.grad, *(p.grad for p in grads))]

    reference = run(variants["krona"], params["krona"])
    errors = {}
    for name, fn in variants.items():
        if name.startswith("krona") and name != "krona":
            got = run(fn, params["krona"])
            errors[name] = max(
                float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(got, reference, strict=True)
            )
    return errors


def measure(
    tokens=TOKENS,
    *,
    mode: str = "train",
    variants=CPU_VARIANTS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 300,
    warmup: int = 20,
    backend: str = "inductor",
    baseline=None,
) -> list[dict]:
    """One row per token count: median ms per variant (interleaved) of forward + backward (``mode="train"``) or
    of the forward under no_grad (``"inference"``), and the checks."""
    train = mode == "train"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns, params = make_variants(variants, device, dtype, backend, baseline)
    grads = {name: params["lora" if name.startswith("lora") else "krona"] for name in fns}
    failed: dict[str, str] = {}  # a variant that raises (a compile mode this torch or device lacks) is dropped
    rows = []
    for count in tokens:
        x = torch.randn(count, D_IN, generator=torch.Generator().manual_seed(count)).to(device, dtype)
        xg = x.clone().requires_grad_(True)

        def call(name: str, xg: torch.Tensor = xg, x: torch.Tensor = x) -> None:
            if not train:
                with torch.no_grad():
                    fns[name](x)
                return
            for p in grads[name]:
                p.grad = None
            xg.grad = None
            fns[name](xg).sum().backward()

        for name in list(fns):
            try:
                for _ in range(warmup):
                    call(name)
            except Exception as exc:
                if name in ("krona", "lora_r4"):
                    raise
                failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                del fns[name]
        errors = _check(fns, params, x, train)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_ in range(reps):
            # The order rotates round by round: the first call of a round is slower (caches), whichever it is.
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                call(name)
                sync()
                samples[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        row = {"mode": mode, "tokens": count, "ms": {k: round(v, 4) for k, v in ms.items()}}
        row["max_rel_err_vs_krona"] = errors
        if failed:
            row["failed_variants"] = dict(failed)
        row["ratio_to_lora_r4"] = {k: round(v / ms["lora_r4"], 3) for k, v in ms.items() if k.startswith("krona")}
        rows.append(row)
        print(_format_row(row, list(fns)), flush=True)
    return rows


def _format_row(row: dict, names: list[str]) -> str:
    return f"{row['tokens']:>6} " + " ".join(f"{row['ms'][n]:>{max(9, len(n))}.3f}" for n in names)


def summarize(rows: list[dict]) -> dict:
    """At 77 tokens (the cross-attention shape the issue names) and at 1 token: each variant's time over
    krona's (below 1: faster) and over LoRA r4's."""
    summary = {}
    for row in rows:
        if row["tokens"] in (1, 77):
            ms = row["ms"]
            summary[f"{row.get('mode', 'train')}_at_{row['tokens']}_tokens"] = {
                "over_krona": {k: round(v / ms["krona"], 3) for k, v in ms.items()},
                "krona_over_lora_r4": row["ratio_to_lora_r4"],
            }
    summary["max_rel_err_vs_krona"] = max((e for r in rows for e in r["max_rel_err_vs_krona"].values()), default=0.0)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mode", default="both", choices=["train", "inference", "both"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--variants", help="comma-separated (default: every variant for the device and mode)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the *_compiled variants")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--baseline", metavar="REV", help="add krona_baseline: kron_delta at this git revision")
    parser.add_argument("--threads", type=int, help="torch threads (on a shared CPU, fewer than the busy cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    defaults = {
        "train": CUDA_VARIANTS if cuda else CPU_VARIANTS,
        "inference": CUDA_INFERENCE_VARIANTS if cuda else INFERENCE_VARIANTS,
    }
    tokens = tuple(int(t) for t in args.tokens.split(","))
    baseline = load_baseline(args.baseline) if args.baseline else None
    load_start = os.getloadavg()[0]
    rows = []
    for mode in ("train", "inference") if args.mode == "both" else (args.mode,):
        names = tuple(args.variants.split(",")) if args.variants else defaults[mode]
        for required in ("lora_r4", "krona"):
            if required not in names:
                names = (required, *names)
        if baseline is not None and "krona_baseline" not in names:
            names = (names[0], "krona_baseline", *names[1:])
        what = "forward + backward" if mode == "train" else "forward under no_grad"
        print(f"# {mode}: {what} of the update alone, 768->320, A 64x8; {torch.get_num_threads()} torch threads "
              f"on {args.device}, {args.dtype}; median ms of {args.reps}")  # fmt: skip
        print(f"{'tokens':>6} " + " ".join(f"{n:>{max(9, len(n))}}" for n in names))
        rows += measure(
            tokens, mode=mode, variants=names, device=args.device, dtype=getattr(torch, args.dtype), reps=args.reps,
            backend=args.backend, baseline=baseline,
        )  # fmt: skip
    summary = summarize(rows)
    print("summary:", json.dumps(summary))
    if args.json:
        machine = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "dtype": args.dtype,
            "backend": args.backend,
            "reps": args.reps,
            "baseline": args.baseline,
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        }
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
