"""Forward + backward of one adapted linear layer at Stable Diffusion's attention shapes.

Compares Krona's factored A ⊗ B with the peers on the same input, in the same process, with the
measurements interleaved (one call of each method per round) so that machine noise hits all alike:

  krona          ours: (A @ X @ B.T) per token, hand-written backward (shared.krona)
  peft_lokr      PEFT LoKr with the same full factors: builds kron(w1, w2) (d_out x d_in) every call
  lycoris_lokr   LyCORIS LoKr, default (rebuild) mode: also builds kron(w1, w2)
  lycoris_bypass LyCORIS LoKr in bypass mode: its factored kron_bypass path
  lora_r4/r8     PEFT LoRA rank 4 and 8 on the same layer

Two timings per method: `update` (the adapter's own term ΔW x alone, forward + backward to x and
the factors) and `layer` (base linear + update, forward + backward, base weight frozen). Every
peer's layer output is checked against ours (same factors -> same numbers) before timing.

    python benchmarks/adapter_ops.py [--quick] [--json PATH] [--dtype float32|bfloat16] [--device cpu|cuda]

Summary fields (over the rows with the paper's factors (64, 8)):
  speedup_vs_peft_lokr_min  min of peft_lokr.update / krona.update
  ratio_to_lora_r4_max      max of krona.update / lora_r4.update
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.krona import KronaLinear, kron_delta, kron_delta_macs
from shared.krona.lycoris import lycoris_factorization

# (label, tokens, d_in, d_out): SD 1.5 at 512 px has 4096 tokens at width 320, 1024 at 640; SDXL at
# 1024 px has 4096 at 640 and 1024 at 1280. Cross-attention k/v read the 77 text tokens.
FULL_CASES = [
    ("self 320", 4096, 320, 320),
    ("self 320", 1024, 320, 320),
    ("self 640", 4096, 640, 640),
    ("self 640", 1024, 640, 640),
    ("self 1280", 4096, 1280, 1280),
    ("self 1280", 1024, 1280, 1280),
    ("cross k/v 768->320", 77, 768, 320),
    ("cross k/v 2048->1280", 77, 2048, 1280),
]
QUICK_CASES = [
    ("self 320", 4096, 320, 320),
    ("self 1280", 1024, 1280, 1280),
    ("cross k/v 2048->1280", 77, 2048, 1280),
]
PAPER = (64, 8)


def balanced_factors(d_out: int, d_in: int) -> tuple[int, int]:
    """The most square split of each side (LyCORIS's factorization): A is about sqrt(d_out) x sqrt(d_in)."""
    return lycoris_factorization(d_out)[0], lycoris_factorization(d_in)[0]


def make_methods(d_in, d_out, a1, a2, x, grad_out, dtype, device):
    """Closures that run forward + backward for each method, and their layer outputs for checking."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    b1, b2 = d_out // a1, d_in // a2
    a = (torch.randn(a1, a2, device=device) / a1).to(dtype)
    b = (torch.randn(b1, b2, device=device) * 0.02).to(dtype)

    ours = KronaLinear(base)
    ours.add_adapter("default", (a1, a2), dtype=dtype)
    with torch.no_grad():
        ours.krona_a["default"].copy_(a)
        ours.krona_b["default"].copy_(b)
    oa, ob = ours.krona_a["default"], ours.krona_b["default"]

    from peft import LoKrConfig, LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

    peft_lokr = get_peft_model(
        Holder(_clone_linear(base)), LoKrConfig(target_modules=["proj"], r=1)
    ).base_model.model.proj
    for name in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"):
        params = getattr(peft_lokr, name)
        if "default" in params:
            del params["default"]
    peft_lokr.lokr_w1["default"] = nn.Parameter(a.clone())
    peft_lokr.lokr_w2["default"] = nn.Parameter(b.clone())
    peft_lokr.scaling["default"] = 1.0

    from lycoris.modules.lokr import LokrModule

    lyco = {}
    for mode in ("rebuild", "bypass"):
        module = LokrModule(f"lyco_{mode}", _clone_linear(base), multiplier=1.0, lora_dim=1, alpha=1, full_matrix=True)
        # Its own factorization picks other shapes; put the same full factors in as its parameters.
        module.lokr_w1 = nn.Parameter(a.clone())
        module.lokr_w2 = nn.Parameter(b.clone())
        module.scale = 1.0
        module.bypass_mode = mode == "bypass"
        module.to(device=device, dtype=dtype)
        lyco[mode] = module

    loras = {}
    for r in (4, 8):
        layer = get_peft_model(Holder(_clone_linear(base)), LoraConfig(target_modules=["proj"], r=r, lora_alpha=r))
        layer = layer.base_model.model.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.02)
        loras[r] = layer.to(device=device, dtype=dtype)  # PEFT makes its LoRA factors float32

    xg = x.detach().clone().requires_grad_(True)

    def fb(fn):
        def run():
            xg.grad = None
            fn(xg).backward(grad_out)

        return run

    methods = {
        "krona": {"update": fb(lambda t: kron_delta(t, oa, ob)), "layer": fb(ours)},
        "peft_lokr": {
            "update": fb(lambda t: F.linear(t, peft_lokr.get_delta_weight("default"))),
            "layer": fb(peft_lokr),
        },
        "lycoris_lokr": {
            "update": fb(lambda t: F.linear(t, lyco["rebuild"].get_weight((d_out, d_in)))),
            "layer": fb(lyco["rebuild"]),
        },
        "lycoris_bypass": {
            "update": fb(lambda t: lyco["bypass"].bypass_forward_diff(t)),
            "layer": fb(lyco["bypass"]),
        },
        "lora_r4": {
            "update": fb(lambda t: loras[4].lora_B["default"](loras[4].lora_A["default"](t))),
            "layer": fb(loras[4]),
        },
        "lora_r8": {
            "update": fb(lambda t: loras[8].lora_B["default"](loras[8].lora_A["default"](t))),
            "layer": fb(loras[8]),
        },
    }
    with torch.no_grad():
        reference = ours(x)
        outputs = {
            "peft_lokr": peft_lokr(x),
            "lycoris_lokr": lyco["rebuild"](x),
            "lycoris_bypass": lyco["bypass"](x),
        }
    errors = {
        name: float(((out.float() - reference.float()).norm() / reference.float().norm()).item())
        for name, out in outputs.items()
    }
    return methods, errors


def _clone_linear(base: nn.Linear) -> nn.Linear:
    layer = nn.Linear(base.in_features, base.out_features, device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(base.weight)
        layer.bias.copy_(base.bias)
    return layer.requires_grad_(False)


def timed(fns: dict, rounds: int, sync) -> dict[str, float]:
    """Median ms of each closure, calls interleaved round by round after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def run(cases, rounds: int, dtype: torch.dtype, device: str) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for label, tokens, d_in, d_out in cases:
        for kind, (a1, a2) in (("paper", PAPER), ("balanced", balanced_factors(d_out, d_in))):
            g = torch.Generator(device="cpu").manual_seed(1)
            x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype)
            grad_out = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)
            methods, errors = make_methods(d_in, d_out, a1, a2, x, grad_out, dtype, device)
            fns = {f"{m}.{part}": fn for m, parts in methods.items() for part, fn in parts.items()}
            ms = timed(fns, rounds, sync)
            macs, order = kron_delta_macs((a1, a2), (d_out // a1, d_in // a2))
            row = {
                "case": label,
                "tokens": tokens,
                "d_in": d_in,
                "d_out": d_out,
                "factors": kind,
                "a1": a1,
                "a2": a2,
                "krona_macs_per_token": macs,
                "krona_order": order,
                "lora_r4_macs_per_token": 4 * (d_in + d_out),
                "max_rel_err_vs_krona": errors,
                "ms": {k: round(v, 3) for k, v in ms.items()},
            }
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


METHODS = ("krona", "peft_lokr", "lycoris_lokr", "lycoris_bypass", "lora_r4", "lora_r8")


def _format_header() -> str:
    cols = " ".join(f"{m:>15}" for m in METHODS)
    return f"{'case':<22}{'tok':>5} {'A':>7}  part   {cols}  {'lokr/ours':>9} {'ours/r4':>8}"


def _format_row(row: dict) -> str:
    lines = []
    for part in ("update", "layer"):
        ms = [row["ms"][f"{m}.{part}"] for m in METHODS]
        cols = " ".join(f"{v:>12.2f} ms" for v in ms)
        speed = row["ms"][f"peft_lokr.{part}"] / row["ms"][f"krona.{part}"]
        ratio = row["ms"][f"krona.{part}"] / row["ms"][f"lora_r4.{part}"]
        a = f"{row['a1']}x{row['a2']}"
        lines.append(f"{row['case']:<22}{row['tokens']:>5} {a:>7}  {part:<6} {cols}  {speed:>8.1f}x {ratio:>7.2f}x")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    paper = [r for r in rows if r["factors"] == "paper"]

    def ratios(num, den, part):
        return [r["ms"][f"{num}.{part}"] / r["ms"][f"{den}.{part}"] for r in paper]

    return {
        "speedup_vs_peft_lokr_min": round(min(ratios("peft_lokr", "krona", "update")), 2),
        "ratio_to_lora_r4_max": round(max(ratios("krona", "lora_r4", "update")), 2),
        "ratio_to_lora_r4_median": round(statistics.median(ratios("krona", "lora_r4", "update")), 2),
        "speedup_vs_lycoris_bypass_min": round(min(ratios("lycoris_bypass", "krona", "update")), 2),
        "layer_speedup_vs_peft_lokr_min": round(min(ratios("peft_lokr", "krona", "layer")), 2),
        "layer_ratio_to_lora_r4_max": round(max(ratios("krona", "lora_r4", "layer")), 2),
        "max_rel_err_vs_krona": max(e for r in rows for e in r["max_rel_err_vs_krona"].values()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 shapes, 5 rounds: under a minute on 2 CPU cores")
    parser.add_argument("--json", type=Path, help="write {'rows': [...], 'summary': {...}, 'machine': {...}} here")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, help="timed calls per method (default 5 quick, 15 full)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (5 if args.quick else 15)
    cases = QUICK_CASES if args.quick else FULL_CASES
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "rounds": rounds,
    }
    print(f"# adapter_ops on {machine['device']} ({machine['threads']} threads), {args.dtype}, median of {rounds}")
    print("# update = ΔW x alone, layer = base linear + ΔW x; forward + backward; ms per call")
    print(_format_header())
    start = time.perf_counter()
    rows = run(cases, rounds, dtype, args.device)
    summary = summarize(rows)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    print("summary:", json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
