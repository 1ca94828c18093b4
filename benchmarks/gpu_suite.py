"""Every GPU check the README lists as owed, in one command on one GPU, into one JSON (issue 24, item 4).

    python benchmarks/gpu_suite.py [--json PATH] [--sections a,b] [--dry-run] [--budget 570] [--cb-timeout S]
                                   [--eval-base PATH --eval-clip PATH --eval-dino PATH]

Sections, each through the benchmark module that measures the same thing on the CPU:

  adapter_ops          benchmarks/adapter_ops.py in bfloat16 at the SD 1.5 and SDXL attention shapes: Krona's
                       update and layer (forward + backward) vs PEFT LoKr, LyCORIS and PEFT LoRA rank 4 / 8
  adapter_overhead     benchmarks/adapter_overhead.py in bfloat16 at 768 -> 320, 1 to 4928 tokens, forward +
                       backward and the no-grad forward: the op, the plain-autograd form (fewer launches), the
                       autograd.Function under no_grad (before), torch.compile, CUDA graphs; LoRA r4 likewise
  train_step_sdxl      benchmarks/train_step.py: one training step of the SDXL UNet at 1024 px (128x128 latents)
                       in bfloat16 as the trainer runs it (weights bf16, autocast, factors float32), KronA
                       (64, 8) vs LoRA rank 4: seconds per step and peak device memory
  engine_compile       the inference engine (workers/inference/engine.py) in float16 on an SD 1.5 UNet at 512 px
                       (a guidance batch of 2) under torch.compile: how many graphs are compiled over 50 adapter
                       swaps through 4 slots (6 adapters, a mixed-adapter batch and a scale change among them),
                       counted by a counting backend (dynamo's guards decide recompiles, whatever the backend),
                       the graph breaks, and a step's time with inductor vs eager
  swap_h2d             benchmarks/adapter_swap.py's engine swap on the GPU: a host-to-device copy from pinned
                       memory (SD 1.5 and SDXL adapters at (64, 8)), timed to the copy's end; GB/s
  continuous_batching  benchmarks/continuous_batching.py --quick as a subprocess, when the file exists
                       (else "not available"); it has no device option yet, so it measures the CPU (the JSON
                       says so); a run past --cb-timeout is recorded as "timed out"
  evaluation_memory    an adapter's evaluation on a train worker: workers.evaluation.score_adapter with the
                       training components resident (load_components, bf16), as after a training with
                       params.evaluate: device memory before, peak, and seconds. Without --eval-* models it
                       builds SD 1.5, CLIP ViT-L/14 and DINO ViT-S/16 from their configs with random weights
                       (the device reaches no hub): memory and time are the real ones, scores mean nothing

--dry-run runs every section on the CPU with tiny shapes and models (tiny-sd, tiny-sdxl's UNet, tiny-clip,
tiny-dino; torch.compile with the "eager" backend) in one to two minutes, so that CI keeps the script from
rotting (tests/test_gpu_suite.py); its timings mean nothing, but its recompile count is dynamo's own (the guards
do not depend on the backend). Without --dry-run it needs CUDA. The JSON (benchmarks/results/gpu_suite.json, or
gpu_suite_dry_run.json) is written after every section, so a run cut short keeps what it measured; a section
that fails records its error and the others still run; a section that would start past --budget seconds (570 by
default, for a 10-minute slot) is recorded as skipped, and continuous_batching, last, gets what time is left.
Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark modules import each other by file name


@dataclass
class Run:
    dry: bool
    device: str
    work: Path
    args: argparse.Namespace
    deadline: float  # time.monotonic() by which the whole run should end

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, float]:
        """Device memory now and at its peak since ``reset_peak`` (CUDA), or the process's peak RSS (CPU)."""
        if self.cuda:
            return {
                "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
                "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1),
            }
        import resource

        return {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 4)


# Sections ------------------------------------------------------------------------------------------------


def adapter_ops_section(run: Run) -> dict:
    import adapter_ops

    cases = [("tiny 64<-128", 16, 128, 64)] if run.dry else adapter_ops.FULL_CASES
    print(adapter_ops._format_header())
    rows = adapter_ops.run(cases, 2 if run.dry else 15, torch.bfloat16, run.device)
    return {"dtype": "bfloat16", "rows": rows, "summary": adapter_ops.summarize(rows)}


def adapter_overhead_section(run: Run) -> dict:
    import adapter_overhead

    rows = []
    for mode, variants in (
        ("train", adapter_overhead.CUDA_VARIANTS if run.cuda else adapter_overhead.CPU_VARIANTS),
        ("inference", adapter_overhead.CUDA_INFERENCE_VARIANTS if run.cuda else adapter_overhead.INFERENCE_VARIANTS),
    ):
        rows += adapter_overhead.measure(
            (1, 77) if run.dry else adapter_overhead.TOKENS,
            mode=mode,
            variants=variants,
            device=run.device,
            dtype=torch.bfloat16,
            reps=3 if run.dry else 200,
            warmup=2 if run.dry else 20,
            backend="eager" if run.dry else "inductor",
        )
    return {"dtype": "bfloat16", "rows": rows, "summary": adapter_overhead.summarize(rows)}


def train_step_section(run: Run) -> dict:
    import train_step

    if run.dry:
        from shared.models.tiny import tiny_unet_config

        config = {k: v for k, v in tiny_unet_config("tiny-sdxl").items() if not k.startswith("_")}
        latent, steps = 8, 1
    else:
        from shared.models import REFERENCE_UNET_CONFIGS

        config, latent, steps = REFERENCE_UNET_CONFIGS["sdxl"], 128, 5
    rows = train_step.measure_steps(
        latent, steps, ["krona", "lora_r4"], unet_config=config, device=run.device, dtype=torch.bfloat16
    )
    by = {row["method"]: row for row in rows}
    summary = {
        "latent": latent,
        "pixels": latent * 8,
        "step_ratio_to_lora": round(by["krona"]["seconds_per_step"] / by["lora_r4"]["seconds_per_step"], 3),
        "saved_activation_ratio_to_lora": round(
            by["krona"]["saved_activation_mb"] / by["lora_r4"]["saved_activation_mb"], 3
        ),
    }
    if run.cuda:
        summary["peak_memory_ratio_to_lora"] = round(by["krona"]["peak_memory_mb"] / by["lora_r4"]["peak_memory_mb"], 3)
    return {"dtype": "bfloat16", "model": "tiny-sdxl UNet" if run.dry else "SDXL UNet", "rows": rows, **summary}


def _engine_pipeline(run: Run, model: str, adapters: int):
    """(pipeline on the run's device, float16 on CUDA, with a full-size UNet of ``model`` with random weights, or
    tiny-sd's; its adapter files by id). Like adapter_swap._pipeline_with_unet, with the UNet made on the device."""
    from adapter_swap import _krona_files
    from diffusers import UNet2DConditionModel

    from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline

    pipe = load_pipeline("tiny-sd" if model in ("tiny", "sd15") else "tiny-sdxl")
    if model != "tiny":
        torch.manual_seed(0)
        with torch.device(run.device):
            pipe.unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[model]).eval().requires_grad_(False)
    if run.cuda:
        pipe.to(run.device, torch.float16)
    files = _krona_files(pipe, adapters, run.work)
    return pipe, files


def engine_compile_section(run: Run) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters, guard_failures

    from workers.inference.engine import Engine

    # The dry run keeps the events (a slot change, a mixed batch, a scale change) with fewer swaps.
    slots, adapters, swaps = (2, 4, 8) if run.dry else (4, 6, 50)
    pipe, files = _engine_pipeline(run, "tiny" if run.dry else "sd15", adapters)
    engine = Engine(pipe, fetch=files.__getitem__, slots=slots)
    unet = pipe.unet
    config = unet.config
    latent = 8 if run.dry else 64
    dtype = next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, config.in_channels, latent, latent, generator=g).to(run.device, dtype)
    states = torch.randn(2, 77, config.cross_attention_dim, generator=g).to(run.device, dtype)
    timestep = torch.tensor([500], device=run.device)
    ids = sorted(files)

    def step(module) -> None:
        with torch.no_grad():
            module(sample, timestep, encoder_hidden_states=states)

    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    torch._dynamo.config.recompile_limit = 16  # past it a frame runs eagerly: the count stays bounded
    compiled = torch.compile(unet, backend=counting_backend)
    events = []
    slot = engine.slot_for(ids[0])
    engine.route([slot, slot], [1.0, 1.0])
    step(compiled)
    first = len(graphs)
    for i in range(swaps):
        adapter = ids[i % len(ids)]
        slot = engine.slot_for(adapter)
        if i == swaps // 2:  # a mixed batch: the guidance rows with two adapters
            other = engine.slot_for(ids[(i + 1) % len(ids)], pinned={slot})
            engine.route([slot, other], [1.0, 1.0])
            kind = "mixed batch"
        elif i == swaps // 2 + 1:
            engine.route([slot, slot], [0.5, 0.5])
            kind = "scale 0.5"
        else:
            engine.route([slot, slot], [1.0, 1.0])
            kind = "swap"
        before = len(graphs)
        step(compiled)
        if len(graphs) > before:
            events.append({"call": i, "kind": kind, "slot": slot, "new_graphs": len(graphs) - before})
    result = {
        "slots": slots,
        "adapters": adapters,
        "swaps": swaps,
        "graphs_first_call": first,
        "recompiles": len(graphs) - first,
        "recompile_events": events,
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graph_break_reasons": sorted(counters["graph_break"])[:10],
        # Why the guards failed: which value of the routing each recompile specialized on.
        "recompile_reasons": sorted({str(r)[:300] for reasons in guard_failures.values() for r in reasons})[:10],
        "device_evictions": engine.stats()["device_evictions"],
    }
    # A step's time compiled with inductor vs eager, one adapter (the dry run times the counting module: tracing
    # the UNet again would double its time).
    slot = engine.slot_for(ids[0])
    engine.route([slot, slot], [1.0, 1.0])
    if run.dry:
        backend, fast = "eager (counting)", compiled
    else:
        torch._dynamo.reset()
        backend, fast = "inductor", torch.compile(unet)
    started = time.perf_counter()
    step(fast)
    run.sync()
    result["compile_seconds"] = round(time.perf_counter() - started, 2)
    timings: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(3 if run.dry else 20):
        for name, module in (("eager", unet), ("compiled", fast)):
            run.sync()
            start = time.perf_counter()
            step(module)
            run.sync()
            timings[name].append(time.perf_counter() - start)
    result.update(
        backend=backend,
        dtype=str(dtype).removeprefix("torch."),
        latent=latent,
        step_ms_eager=_median_ms(timings["eager"]),
        step_ms_compiled=_median_ms(timings["compiled"]),
    )
    result["compiled_speedup"] = round(result["step_ms_eager"] / result["step_ms_compiled"], 3)
    torch._dynamo.reset()
    return result


def swap_section(run: Run) -> dict:
    from adapter_swap import bench_krona

    result = {}
    for model in ("tiny",) if run.dry else ("sd15", "sdxl"):
        pipe, files = _engine_pipeline(run, model, 3)
        adapter_bytes = _adapter_bytes(pipe, files)
        ms = bench_krona(pipe, files, 50 if run.dry else 1000, sync=run.sync)["ms"]  # milliseconds
        entry = {"swaps": len(ms), "median_ms": round(statistics.median(ms), 4), "p99_ms": round(_p99(ms), 4)}
        entry["dtype"] = str(next(pipe.unet.parameters()).dtype).removeprefix("torch.")
        entry["adapter_mb"] = round(adapter_bytes / 2**20, 3)
        entry["gb_per_s"] = round(adapter_bytes / (entry["median_ms"] / 1e3) / 1e9, 2)
        result[model] = entry
        del pipe
    return result


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _adapter_bytes(pipe, files: dict[str, bytes]) -> int:
    """Bytes one adapter occupies in the engine's slot (its factors in the weights' dtype)."""
    from safetensors.torch import load

    element = next(pipe.unet.parameters()).element_size()
    return sum(t.numel() for t in load(next(iter(files.values()))).values()) * element


def continuous_batching_section(run: Run) -> dict:
    script = ROOT / "benchmarks" / "continuous_batching.py"
    if not script.is_file():
        return {"status": "not available", "reason": f"{script.relative_to(ROOT)} does not exist"}
    out = run.work / "continuous_batching.json"
    command = [sys.executable, str(script), "--quick", "--json", str(out)]
    if run.dry:
        command += ["--requests", "4", "--rates", "1.6"]
    on_gpu = '"--device"' in script.read_text()  # an option it declares (read, not run: `--help` imports torch)
    if on_gpu and run.cuda:
        command += ["--device", "cuda"]
    timeout = run.args.cb_timeout or (120 if run.dry else 300)
    timeout = max(30, min(timeout, int(run.deadline - time.monotonic())))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "timeout_seconds": timeout, "command": command[1:]}
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0 or not out.is_file():
        return {"status": "failed", "returncode": done.returncode, "stderr_tail": done.stderr[-2000:]}
    document = json.loads(out.read_text())
    return {
        "status": "ok",
        "command": command[1:],
        "seconds": seconds,
        "ran_on": "cuda" if on_gpu and run.cuda else "cpu (the script has no --device option)",
        "summary": document.get("summary"),
        "machine": document.get("machine"),
    }


def _random_eval_models(folder: Path) -> tuple[str, str, str]:
    """SD 1.5, CLIP ViT-L/14 and DINO ViT-S/16 with their real configs and random weights, saved into ``folder``."""
    import diffusers
    import transformers

    from shared.models import REFERENCE_UNET_CONFIGS
    from shared.models.tiny import TINY_MODEL_CONFIGS
    from shared.models.tokenizer import (
        CLIP_MAX_LENGTH,
        VOCAB_SIZE,
        build_clip_tokenizer,
        write_clip_tokenizer_files,
    )

    specials = {"bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1}
    text = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": CLIP_MAX_LENGTH, **specials}
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    )  # fmt: skip
    encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            **text, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", projection_dim=768,
        )
    )  # fmt: skip
    scheduler = TINY_MODEL_CONFIGS["tiny-sd"]["scheduler"]["config"]
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**REFERENCE_UNET_CONFIGS["sd15"]), vae=vae, text_encoder=encoder,
        tokenizer=build_clip_tokenizer(), scheduler=diffusers.DDIMScheduler(**scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    base = folder / "sd15-random"
    pipe.to(torch.float16).save_pretrained(base)
    write_clip_tokenizer_files(base / "tokenizer")
    del pipe
    clip = folder / "clip-vit-large-patch14-random"
    config = transformers.CLIPConfig(
        text_config={**text, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
        projection_dim=768,
    )  # fmt: skip
    transformers.CLIPModel(config).save_pretrained(clip)
    transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(), tokenizer=build_clip_tokenizer()
    ).save_pretrained(clip)
    write_clip_tokenizer_files(clip)
    dino = folder / "dino-vits16-random"
    vit = transformers.ViTConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=16,
        image_size=224, qkv_bias=True,
    )  # fmt: skip
    transformers.ViTModel(vit, add_pooling_layer=False).save_pretrained(dino)
    transformers.ViTImageProcessor().save_pretrained(dino)
    return str(base), str(clip), str(dino)


def evaluation_memory_section(run: Run) -> dict:
    import numpy as np
    from PIL import Image

    from shared.krona import KronaConfig, adapter_state_dict, delete_adapter, inject_adapter, save_adapter
    from workers.evaluation import score_adapter
    from workers.training.components import load_components

    args = run.args
    built = False
    if run.dry:
        base, clip, dino = "tiny-sd", "tiny-clip", "tiny-dino"
    elif args.eval_base and args.eval_clip and args.eval_dino:
        base, clip, dino = args.eval_base, args.eval_clip, args.eval_dino
    else:
        started = time.perf_counter()
        base, clip, dino = _random_eval_models(run.work / "eval-models")
        built = round(time.perf_counter() - started, 1)
    run.reset_peak()
    # What a train worker holds after a training: its components, cached per base model (workers/training/job.py).
    components = load_components(base, device=run.device, mixed_precision="bf16" if run.cuda else "no")
    resident = run.memory()
    unet = components.unet
    inject_adapter(unet, KronaConfig(), dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, parameter in unet.named_parameters():
            if "krona_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.01)
    adapter = save_adapter(run.work / "eval-adapter.safetensors", adapter_state_dict(unet), KronaConfig())
    delete_adapter(unet, "default")
    references = run.work / "references"
    references.mkdir(exist_ok=True)
    size = 64 if run.dry else 512
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(references / f"{i}.png")
    state = {
        "prompts": 2,
        "images_per_prompt": 2,
        "steps": 2 if run.dry else 25,
        "class_noun": "dog",
        "identifier": "sks",
        "models": {"clip": clip, "dino": dino},
    }
    run.reset_peak()
    started = time.perf_counter()
    scores = score_adapter(
        base_model=base, adapter_path=adapter, reference_dir=references, state=state, device=run.device,
        work=run.work / "eval-work",
    )  # fmt: skip
    run.sync()
    seconds = round(time.perf_counter() - started, 2)
    peak = run.memory()
    del components
    return {
        "models": {"base": base, "clip": clip, "dino": dino, "random_weights": bool(built) or run.dry},
        "build_seconds": built or 0.0,
        "images": state["prompts"] * state["images_per_prompt"],
        "steps": state["steps"],
        "train_components_resident": resident,
        "during_evaluation": peak,
        "seconds": seconds,
        "scores": scores,
    }


SECTIONS = {
    "adapter_ops": adapter_ops_section,
    "adapter_overhead": adapter_overhead_section,
    "train_step_sdxl": train_step_section,
    "engine_compile": engine_compile_section,
    "swap_h2d": swap_section,
    "evaluation_memory": evaluation_memory_section,
    "continuous_batching": continuous_batching_section,  # last: a CPU benchmark today, given what time is left
}


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="default benchmarks/results/gpu_suite.json (gpu_suite_dry_run.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and models: checks the script")
    parser.add_argument("--budget", type=int, default=570, help="seconds for the whole run (default %(default)s)")
    parser.add_argument("--cb-timeout", type=int, help="continuous_batching: seconds (default 120 dry, 300)")
    parser.add_argument("--eval-base", help="evaluation_memory: a local base model folder (default: random SD 1.5)")
    parser.add_argument("--eval-clip", help="evaluation_memory: a local CLIP folder (default: random ViT-L/14)")
    parser.add_argument("--eval-dino", help="evaluation_memory: a local DINO folder (default: random ViT-S/16)")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; they are: {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: this suite is for a GPU; --dry-run checks it on the CPU")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = "cpu" if args.dry_run else "cuda"
    args.json = args.json or ROOT / "benchmarks" / "results" / f"gpu_suite{'_dry_run' if args.dry_run else ''}.json"
    document: dict = {
        "suite": "gpu_suite",
        "commit": _commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "meaningful": not args.dry_run,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "load_average_start": round(os.getloadavg()[0], 2),
        },
        "sections": {},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start_clock = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="krona-gpu-suite-") as tmp:
        for name in names:
            print(f"\n## {name}", flush=True)
            work = Path(tmp) / name
            work.mkdir()
            section_start = time.perf_counter()
            deadline = start_clock + args.budget
            if not args.dry_run and time.monotonic() > deadline - 30:
                result = {"status": "skipped", "reason": f"past the {args.budget} s budget"}
                document["sections"][name] = result
                continue
            try:
                result = SECTIONS[name](Run(args.dry_run, device, work, args, deadline))
                result.setdefault("status", "ok")
            except Exception as exc:  # one section's failure must not lose the others' numbers
                traceback.print_exc()
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            result["section_seconds"] = round(time.perf_counter() - section_start, 1)
            document["sections"][name] = result
            document["seconds"] = round(time.perf_counter() - started, 1)
            args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
            print(f"## {name}: {result['status']} in {result['section_seconds']} s", flush=True)
    print(f"wrote {args.json} ({document['seconds']} s)")
    return document


if __name__ == "__main__":
    main()
