"""Adapter swap latency and memory growth: Krona's engine vs diffusers' LoRA hotswap and loading vs PEFT LoKr.

On a full-size UNet (SD 1.5, and SDXL unless --quick) with random weights on the CPU:

  krona              Engine.slot_for with three adapters rotating through two slots: every call copies
                     an adapter's factors into a slot (host tier -> device slots), the engine's real swap
  diffusers_hotswap  pipe.enable_lora_hotswap(target_rank=4) before the first load, then
                     pipe.load_lora_weights(state_dict, adapter_name="default_0", hotswap=True) with
                     three LoRA state dicts rotating: what a diffusers server that keeps the model
                     resident would use. It is LoRA (rank 4 on the same layers), not LoKr: the closest
                     peer diffusers has, since it cannot hot-swap LoKr files
  diffusers          pipe.load_lora_weights(state_dict) + pipe.unload_lora_weights(), LoRA rank 4 (the
                     slow path, without hotswap)
  peft_lokr          set_peft_model_state_dict(unet, factors) into one LoKr adapter (PEFT LoKrConfig,
                     r=8) with three sets of real factors rotating: loading LoKr factors into PEFT

and the resident-set growth over the swaps. Prints a table (median and p99 per method, the torch thread
count and the machine's load average at the start, since a copy of a few megabytes takes 0.03 ms on a
quiet 2-core machine and milliseconds while another process runs), writes JSON with summary fields
krona_swap_ms_median, krona_swap_ms_p99, diffusers_hotswap_ms_median, speedup_vs_diffusers_hotswap,
sdxl_speedup_vs_diffusers_hotswap, speedup_vs_diffusers (the slow path), speedup_vs_peft_lokr,
rss_growth_mb.

    python benchmarks/adapter_swap.py [--quick] [--json PATH] [--swaps 1000] [--peer-swaps 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.krona import KronaConfig, adapter_state_dict, inject_adapter, save_adapter
from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline
from workers.inference.engine import Engine

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _pipeline_with_unet(model: str):
    """A tiny pipeline whose UNet is replaced by a full-size one from the real config (random weights)."""
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline("tiny-sdxl" if model == "sdxl" else "tiny-sd")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[model]).eval().requires_grad_(False)
    return pipe


def _krona_files(pipe, count: int, folder: Path) -> dict[str, bytes]:
    unet = pipe.unet
    inject_adapter(unet, KronaConfig())
    files = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "krona_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        path = save_adapter(folder / f"{i}.safetensors", adapter_state_dict(unet), KronaConfig())
        files[f"adp_{i}"] = path.read_bytes()
    from shared.krona import delete_adapter

    delete_adapter(unet, "default")
    return files


def bench_krona(pipe, files: dict[str, bytes], swaps: int, sync=None) -> dict:
    """``sync``: called before the clock stops (``torch.cuda.synchronize`` on a GPU, where the swap is an
    asynchronous host-to-device copy from pinned memory)."""
    engine = Engine(pipe, fetch=files.__getitem__, slots=2)
    ids = sorted(files)
    sync = sync or (lambda: None)
    for adapter_id in ids * 3:  # warm-up: host tier filled, slots allocated at construction
        engine.slot_for(adapter_id)
    rss = _rss_mb()
    times = []
    for i in range(swaps):
        sync()
        start = time.perf_counter()
        engine.slot_for(ids[i % len(ids)])
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    growth = _rss_mb() - rss
    assert engine.stats()["device_evictions"] >= swaps
    # Unwrap, so that the peers below see plain Linear layers again.
    for path, layer in engine.layers.items():
        parent, _, child = path.rpartition(".")
        setattr(pipe.unet.get_submodule(parent), child, layer.base_layer)
    return {"ms": times, "rss_growth_mb": growth}


def _lora_state_dict(unet, rank: int = 4) -> dict[str, torch.Tensor]:
    state = {}
    g = torch.Generator().manual_seed(0)
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(tuple(TARGETS)):
            state[f"unet.{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            state[f"unet.{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return state


def bench_diffusers(pipe, swaps: int) -> dict:
    state = _lora_state_dict(pipe.unet)
    pipe.load_lora_weights(dict(state), adapter_name="warmup")
    pipe.unload_lora_weights()
    rss = _rss_mb()
    times = []
    for i in range(swaps):
        start = time.perf_counter()
        pipe.load_lora_weights(dict(state), adapter_name=f"a{i}")
        pipe.unload_lora_weights()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": times, "rss_growth_mb": _rss_mb() - rss}


def bench_diffusers_hotswap(pipe, swaps: int) -> dict:
    """diffusers' hotswap: the LoRA layers stay, their weights are replaced in place."""
    states = []
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        states.append({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in _lora_state_dict(pipe.unet).items()})
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(dict(states[0]), adapter_name="default_0")
    for state in states:  # warm-up
        pipe.load_lora_weights(dict(state), adapter_name="default_0", hotswap=True)
    rss = _rss_mb()
    times = []
    for i in range(swaps):
        state = dict(states[i % len(states)])
        start = time.perf_counter()
        pipe.load_lora_weights(state, adapter_name="default_0", hotswap=True)
        times.append((time.perf_counter() - start) * 1e3)
    growth = _rss_mb() - rss
    pipe.unload_lora_weights()
    return {"ms": times, "rss_growth_mb": growth}


def bench_peft_lokr(pipe, swaps: int) -> dict:
    """Loading real LoKr factors into PEFT: one adapter, three sets of factors copied in turn."""
    from peft import LoKrConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = LoKrConfig(r=8, target_modules=TARGETS)
    pipe.unet.add_adapter(config, adapter_name="lokr")
    template = get_peft_model_state_dict(pipe.unet, adapter_name="lokr")
    states = []
    for seed in range(3):
        g = torch.Generator().manual_seed(200 + seed)
        states.append({k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.01 for k, v in template.items()})
    for state in states:  # warm-up
        set_peft_model_state_dict(pipe.unet, state, adapter_name="lokr")
    rss = _rss_mb()
    times = []
    for i in range(swaps):
        start = time.perf_counter()
        result = set_peft_model_state_dict(pipe.unet, states[i % len(states)], adapter_name="lokr")
        times.append((time.perf_counter() - start) * 1e3)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    growth = _rss_mb() - rss
    pipe.unet.delete_adapters("lokr")
    return {"ms": times, "rss_growth_mb": growth}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SD 1.5 only, 200 Krona swaps, 5 peer swaps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--swaps", type=int, help="Krona swaps (default 1000; 200 with --quick)")
    parser.add_argument("--peer-swaps", type=int, help="diffusers and PEFT swaps (default 20; 5 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    swaps = args.swaps or (200 if args.quick else 1000)
    peer = args.peer_swaps or (5 if args.quick else 20)
    models = ["sd15"] if args.quick else ["sd15", "sdxl"]
    import tempfile

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    rows = []
    import os

    load = os.getloadavg()[0]
    print(
        f"# adapter_swap on the CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load average "
        f"{load:.2f} at the start); Krona {swaps} swaps, peers {peer}"
    )
    print(f"{'model':<6} {'method':<18} {'median ms':>10} {'p99 ms':>9} {'RSS growth MB':>14} {'swaps':>6}")
    for model in models:
        pipe = _pipeline_with_unet(model)
        with tempfile.TemporaryDirectory() as tmp:
            files = _krona_files(pipe, 3, Path(tmp))
        results = {
            "krona": bench_krona(pipe, files, swaps),
            "diffusers_hotswap": bench_diffusers_hotswap(pipe, peer),
            "diffusers": bench_diffusers(pipe, peer),
            "peft_lokr": bench_peft_lokr(pipe, peer),
        }
        for method, result in results.items():
            row = {
                "model": model,
                "method": method,
                "median_ms": statistics.median(result["ms"]),
                "p99_ms": p99(result["ms"]),
                "rss_growth_mb": result["rss_growth_mb"],
                "swaps": len(result["ms"]),
            }
            rows.append(row)
            print(
                f"{model:<6} {method:<18} {row['median_ms']:>10.2f} {row['p99_ms']:>9.2f} "
                f"{row['rss_growth_mb']:>14.1f} {row['swaps']:>6}",
                flush=True,
            )
        del pipe
        gc.collect()
    by = {(r["model"], r["method"]): r for r in rows}
    krona = by[("sd15", "krona")]["median_ms"]
    summary = {
        "krona_swap_ms_median": round(krona, 3),
        "krona_swap_ms_p99": round(by[("sd15", "krona")]["p99_ms"], 3),
        "diffusers_hotswap_ms_median": round(by[("sd15", "diffusers_hotswap")]["median_ms"], 2),
        "speedup_vs_diffusers_hotswap": round(by[("sd15", "diffusers_hotswap")]["median_ms"] / krona, 1),
        "diffusers_swap_ms_median": round(by[("sd15", "diffusers")]["median_ms"], 1),
        "speedup_vs_diffusers": round(by[("sd15", "diffusers")]["median_ms"] / krona, 1),
        "speedup_vs_peft_lokr": round(by[("sd15", "peft_lokr")]["median_ms"] / krona, 1),
        "rss_growth_mb": round(max(r["rss_growth_mb"] for r in rows if r["method"] == "krona"), 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(load, 2),
    }
    if ("sdxl", "krona") in by:
        sdxl = by[("sdxl", "krona")]["median_ms"]
        summary["sdxl_krona_swap_ms_median"] = round(sdxl, 3)
        summary["sdxl_krona_swap_ms_p99"] = round(by[("sdxl", "krona")]["p99_ms"], 3)
        summary["sdxl_speedup_vs_diffusers_hotswap"] = round(by[("sdxl", "diffusers_hotswap")]["median_ms"] / sdxl, 1)
        summary["sdxl_speedup_vs_diffusers"] = round(by[("sdxl", "diffusers")]["median_ms"] / sdxl, 1)
    print("summary:", json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
