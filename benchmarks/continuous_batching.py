"""Step-level joining vs today's gathered batches vs one-at-a-time diffusers LoRA hotswap, under open-loop Poisson
arrivals (issue 24 item 2).

Requests: an adapter drawn from a pool of 32 (Krona (64, 8) factors for the engine, LoRA rank 4 on the same layers
for diffusers), steps uniform in [lo, hi], guidance 7.5, a seed of their own, one image, one size. Arrival times
are Poisson at each rate; every method gets the same trace at a rate. The server is one in-process worker on one
thread, in real time: a request is seen at the server's next decision point after its arrival time, as a worker
sees the queue. Methods, interleaved rate by rate (their order rotates):

  hotswap   diffusers, one request at a time in arrival order: pipe.load_lora_weights(its LoRA,
            adapter_name="default_0", hotswap=True) (after pipe.enable_lora_hotswap(target_rank=4) and a first
            load), then pipe(...): the strongest setup a resident diffusers server has for many adapters
  gathered  today's worker (before step-level joining): take the oldest request, wait KRONA_BATCH_WAIT_MS (50 ms)
            for company, gather the arrived requests with the same steps and guidance up to 8 images, and run
            them as one mixed-adapter batch through all their steps (Engine.run)
  joining   step-level joining (workers/inference/loop.py): arrived requests join the running loop at the next
            step boundary (up to 8 images); finished ones leave and are decoded at once

Per model, rate and method: throughput (images/s: completed images over the span from the first arrival to the
last completion), latency p50 / p99 (completion minus arrival), the mean number of requests per UNet call.
Models: tiny-sd (64 px) and a full-size SD 1.5 UNet with random weights at 64 px, with tiny-sd's VAE and a
2-layer CLIP text encoder 768 wide (the full pipeline at 128 px or more is too slow for a 2-core CPU run).

Rates are given as multiples of the one-at-a-time capacity (1 / the median time of a request alone on the
engine, measured first): below 1 every method keeps up (same throughput, compare latency); above 1 the queue
grows and throughput is each method's capacity (saturation).

Defaults (about 15-20 minutes on the 2-core VM under load): tiny-sd with steps 4-25, 24 requests per run, rates
0.5, 0.85 and 1.6, two rounds (the table gives the median of the rounds; the JSON each round); the SD 1.5 UNet
with steps 2-5, 5 requests per run, rates 0.7 and 1.6, one round (a denoising step of it takes seconds on this
CPU, so its runs are short and their p99 is their slowest request). One torch thread by default:
on a shared 2-core machine, two OpenMP threads under contention ran the same pipeline 10-60x slower and erratic.

    python benchmarks/continuous_batching.py [--quick] [--json PATH] [--models tiny-sd,sd15] [--rates 0.5,0.85,1.6]
        [--requests N] [--sd15-requests N] [--sd15-rates 0.7,1.6] [--rounds 2] [--sd15-rounds 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.krona import KronaConfig, adapter_state_dict, delete_adapter, inject_adapter, save_adapter
from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline
from workers.inference.engine import Engine, Request
from workers.inference.loop import DenoisingLoop

ADAPTERS = 32
MAX_IMAGES = 8
BATCH_WAIT_SECONDS = 0.05
GUIDANCE = 7.5
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPTS = ("a photo of sks dog", "sks dog on the moon", "a painting of sks cat", "sks toy in a garden")


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the run's start
    adapter: int
    steps: int
    seed: int
    prompt: str


def poisson_trace(rate: float, count: int, steps: tuple[int, int], seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    at, trace = 0.0, []
    for _ in range(count):
        trace.append(
            Arrival(at, rng.randrange(ADAPTERS), rng.randint(*steps), rng.randrange(2**31), rng.choice(PROMPTS))
        )
        at += rng.expovariate(rate)
    return trace


# Models ------------------------------------------------------------------------------------------------------


def build_pipelines(model: str):
    """(the engine's pipeline, the diffusers peer's pipeline): the same weights (the peer's UNet shares the
    engine's parameter tensors), text encoder, VAE and scheduler config."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = load_pipeline("tiny-sd")
    if model == "sd15":
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS["sd15"]).eval().requires_grad_(False)
        wide = {**pipe.text_encoder.config.to_dict(), "hidden_size": 768, "intermediate_size": 3072,
                "num_attention_heads": 12}  # fmt: skip
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(wide)).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    with torch.device("meta"):
        peer_unet = UNet2DConditionModel.from_config(pipe.unet.config)
    peer_unet.load_state_dict(pipe.unet.state_dict(), assign=True)
    peer = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=peer_unet.eval().requires_grad_(False),
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    return pipe, peer


def krona_files(pipe, folder: Path) -> dict[str, bytes]:
    """ADAPTERS adapter files with non-zero random factors (before the engine wraps the layers)."""
    inject_adapter(pipe.unet, KronaConfig(target_modules=TARGETS))
    files = {}
    for i in range(ADAPTERS):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "krona_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        path = save_adapter(folder / f"{i}.safetensors", adapter_state_dict(pipe.unet), KronaConfig())
        files[f"adp_{i}"] = path.read_bytes()
    delete_adapter(pipe.unet, "default")
    return files


def lora_states(unet, rank: int = 4) -> list[dict[str, torch.Tensor]]:
    linears = [
        (path, m) for path, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and path.endswith(TARGETS)
    ]
    states = []
    for i in range(ADAPTERS):
        g = torch.Generator().manual_seed(1000 + i)
        state = {}
        for path, module in linears:
            state[f"unet.{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            state[f"unet.{path}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
        states.append(state)
    return states


# The three servers -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def sleep_until(self, at: float) -> None:
        delay = at - self.now()
        if delay > 0:
            time.sleep(delay)


# Each server returns the completion time of every request (seconds after the start, in completion order, as
# (arrival, completed) pairs) and the number of requests in each UNet call.
Served = tuple[list[tuple[Arrival, float]], list[int]]


def serve_hotswap(peer, loras, trace: list[Arrival], size: int) -> Served:
    clock, completed, current = Clock(), [], None
    for arrival in trace:
        clock.sleep_until(arrival.at)
        if arrival.adapter != current:
            peer.load_lora_weights(dict(loras[arrival.adapter]), adapter_name="default_0", hotswap=True)
            current = arrival.adapter
        peer(arrival.prompt, num_inference_steps=arrival.steps, guidance_scale=GUIDANCE, width=size, height=size,
             generator=torch.Generator().manual_seed(arrival.seed), output_type="np")  # fmt: skip
        completed.append((arrival, clock.now()))
    return completed, [1] * len(trace)


def _request(arrival: Arrival) -> Request:
    return Request(arrival.prompt, adapter_id=f"adp_{arrival.adapter}", seed=arrival.seed)


def serve_gathered(engine: Engine, trace: list[Arrival], size: int) -> Served:
    clock, completed, batches = Clock(), [], []
    pending: deque[Arrival] = deque()
    upcoming = deque(trace)

    def arrivals() -> None:
        while upcoming and upcoming[0].at <= clock.now():
            pending.append(upcoming.popleft())

    while upcoming or pending:
        arrivals()
        if not pending:
            clock.sleep_until(upcoming[0].at)
            continue
        first = pending.popleft()
        time.sleep(BATCH_WAIT_SECONDS)
        arrivals()
        batch = [first]
        for arrival in list(pending):
            if len(batch) < MAX_IMAGES and arrival.steps == first.steps:
                batch.append(arrival)
                pending.remove(arrival)
        engine.run([_request(a) for a in batch], steps=first.steps, guidance_scale=GUIDANCE, width=size, height=size)
        done = clock.now()
        completed += [(a, done) for a in batch]
        batches += [len(batch)] * first.steps
    return completed, batches


def serve_joining(engine: Engine, trace: list[Arrival], size: int) -> Served:
    clock, completed, batches = Clock(), [], []
    pending: deque[Arrival] = deque()
    upcoming = deque(trace)
    loop = DenoisingLoop(engine, width=size, height=size, max_images=MAX_IMAGES)
    while upcoming or pending or loop.active:
        while upcoming and upcoming[0].at <= clock.now():
            pending.append(upcoming.popleft())
        while pending and loop.room > 0 and loop.can_host(f"adp_{pending[0].adapter}"):
            arrival = pending.popleft()
            loop.join(arrival, _request(arrival), steps=arrival.steps, guidance_scale=GUIDANCE)
        if not loop.active:
            clock.sleep_until(upcoming[0].at)
            continue
        batches.append(len(loop.active))
        for finished in loop.step():
            loop.decode(finished)
            completed.append((finished.key, clock.now()))
    return completed, batches


# Running -----------------------------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def alone_seconds(engine: Engine, size: int, steps: tuple[int, int], repeats: int = 3) -> float:
    """The median time of one request of mean steps alone on the engine (warms it up too)."""
    mean_steps = round(sum(steps) / 2)
    times = []
    for i in range(repeats + 1):
        trace = [Arrival(0.0, i % ADAPTERS, mean_steps, i, PROMPTS[0])]
        started = time.perf_counter()
        serve_joining(engine, trace, size)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def bench_model(
    model: str, rates: list[float], count: int, steps: tuple[int, int], size: int, seed: int, rounds: int
) -> dict:
    pipe, peer = build_pipelines(model)
    with tempfile.TemporaryDirectory() as folder:
        files = krona_files(pipe, Path(folder))
    loras = lora_states(peer.unet)
    engine = Engine(pipe, fetch=files.__getitem__, slots=8, max_batch=MAX_IMAGES)
    engine.cache.prefetch(sorted(files))  # the host tier holds the pool, as a warm worker's does
    peer.enable_lora_hotswap(target_rank=4)
    peer.load_lora_weights(dict(loras[0]), adapter_name="default_0")
    servers = {
        "hotswap": lambda trace: serve_hotswap(peer, loras, trace, size),
        "gathered": lambda trace: serve_gathered(engine, trace, size),
        "joining": lambda trace: serve_joining(engine, trace, size),
    }
    warm = poisson_trace(100.0, 2, (2, 2), seed)  # first calls of each path, untimed
    for serve in servers.values():
        serve(warm)
    alone = alone_seconds(engine, size, steps, repeats=3 if model == "tiny-sd" else 2)
    capacity = 1 / alone
    print(f"\n# {model} at {size} px, steps {steps[0]}-{steps[1]}, {count} requests per run, {rounds} round(s); "
          f"one request of mean steps alone: {alone:.3f} s (capacity one at a time {capacity:.2f} req/s)",
          flush=True)  # fmt: skip
    header = f"{'rate x':>6} {'req/s':>7} {'method':<9} {'images/s':>9} {'p50 s':>8} {'p99 s':>8} {'req/UNet call':>13}"
    print("runs, in the order they ran:\n" + header)
    names = list(servers)
    runs = []
    for round_ in range(rounds):
        for k, multiple in enumerate(rates):
            rate = multiple * capacity
            trace = poisson_trace(rate, count, steps, seed + 1000 * round_ + k)  # the same for every method
            shift = (k + round_) % len(names)
            for name in names[shift:] + names[:shift]:  # the order rotates run by run
                started = time.perf_counter()
                completed, batches = servers[name](trace)
                latencies = [done - arrival.at for arrival, done in completed]
                span = max(done for _, done in completed) - trace[0].at
                run = {
                    "round": round_,
                    "rate_multiple": multiple,
                    "method": name,
                    "throughput_images_per_s": len(latencies) / span,
                    "latency_p50_s": statistics.median(latencies),
                    "latency_p99_s": p99(latencies),
                    "requests_per_unet_call": statistics.mean(batches),
                    "wall_s": round(time.perf_counter() - started, 1),
                    "load_average": round(os.getloadavg()[0], 2),
                }
                runs.append(run)
                print(f"{multiple:>6} {rate:>7.3f} {name:<9} {run['throughput_images_per_s']:>9.3f} "
                      f"{run['latency_p50_s']:>8.2f} {run['latency_p99_s']:>8.2f} "
                      f"{run['requests_per_unet_call']:>13.2f}", flush=True)  # fmt: skip
    rows = []
    print(f"medians over the rounds:\n{header}")
    for multiple in rates:
        for name in names:
            mine = [r for r in runs if r["rate_multiple"] == multiple and r["method"] == name]
            row = {"model": model, "rate_multiple": multiple, "rate_per_s": round(multiple * capacity, 4),
                   "method": name, "requests": count, "rounds": len(mine)}  # fmt: skip
            for key in ("throughput_images_per_s", "latency_p50_s", "latency_p99_s", "requests_per_unet_call"):
                row[key] = round(statistics.median(r[key] for r in mine), 4 if key.startswith("throughput") else 3)
                row[f"{key}_per_round"] = [round(r[key], 3) for r in mine]
            rows.append(row)
            print(f"{multiple:>6} {row['rate_per_s']:>7.3f} {name:<9} {row['throughput_images_per_s']:>9.3f} "
                  f"{row['latency_p50_s']:>8.2f} {row['latency_p99_s']:>8.2f} {row['requests_per_unet_call']:>13.2f}",
                  flush=True)  # fmt: skip
    return {"alone_s": alone, "capacity_one_at_a_time": capacity, "rows": rows, "runs": runs}


def summarize(rows: list[dict]) -> dict:
    """Per model: p99(joining) / p99(gathered) at each rate where both keep up (same throughput within 10 %), and
    throughput(joining) / throughput(gathered) at the highest rate (saturation)."""
    summary = {}
    for model in sorted({r["model"] for r in rows}):
        by = {(r["rate_multiple"], r["method"]): r for r in rows if r["model"] == model}
        rates = sorted({rate for rate, _ in by})
        p99_ratio, same_throughput = {}, {}
        for rate in rates:
            joining, gathered = by[(rate, "joining")], by[(rate, "gathered")]
            p99_ratio[str(rate)] = round(joining["latency_p99_s"] / gathered["latency_p99_s"], 3)
            same_throughput[str(rate)] = (
                abs(joining["throughput_images_per_s"] / gathered["throughput_images_per_s"] - 1) <= 0.1
            )
        top = rates[-1]
        saturation = round(
            by[(top, "joining")]["throughput_images_per_s"] / by[(top, "gathered")]["throughput_images_per_s"], 3
        )
        summary[model] = {
            "p99_joining_over_gathered": p99_ratio,
            "same_throughput": same_throughput,
            # None when no rate had the same throughput for both (nothing to compare at equal throughput).
            "p99_goal_met_where_same_throughput": (
                all(p99_ratio[str(r)] <= 0.5 for r in rates if same_throughput[str(r)])
                if any(same_throughput.values())
                else None
            ),
            "saturation_throughput_joining_over_gathered": saturation,
            "saturation_goal_met": saturation >= 1.0,
            "saturation_throughput_joining_over_hotswap": round(
                by[(top, "joining")]["throughput_images_per_s"] / by[(top, "hotswap")]["throughput_images_per_s"], 3
            ),
        }
    return summary


def _commit() -> str:
    """HEAD, with "+changes" when tracked files differ from it (a run on a working tree)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return f"{head}+changes" if changed else head


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny-sd only, rates 0.7 and 1.6, 16 requests, steps 4-12, one round"
    )
    parser.add_argument("--json", type=Path, help="default benchmarks/results/continuous_batching.json")
    parser.add_argument("--models", help="comma-separated: tiny-sd, sd15 (default both; tiny-sd with --quick)")
    parser.add_argument("--rates", help="tiny-sd: multiples of the one-at-a-time capacity (default 0.5,0.85,1.6)")
    parser.add_argument("--sd15-rates", help="the SD 1.5 UNet: the same (default 0.7,1.6)")
    parser.add_argument("--requests", type=int, help="requests per run on tiny-sd (default 24; 16 with --quick)")
    parser.add_argument("--sd15-requests", type=int, help="requests per run on the SD 1.5 UNet (default 5)")
    parser.add_argument("--rounds", type=int, help="tiny-sd rounds, medians reported (default 2; 1 with --quick)")
    parser.add_argument("--sd15-rounds", type=int, default=1, help="the SD 1.5 UNet's rounds (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    models = (args.models or ("tiny-sd" if args.quick else "tiny-sd,sd15")).split(",")
    rates = [float(r) for r in (args.rates or ("0.7,1.6" if args.quick else "0.5,0.85,1.6")).split(",")]
    sd15_rates = [float(r) for r in (args.sd15_rates or "0.7,1.6").split(",")]
    load_start = os.getloadavg()[0]
    print(f"# continuous_batching on the CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"load average {load_start:.2f} at the start)", flush=True)  # fmt: skip
    results, rows = {}, []
    for model in models:
        if model == "sd15":
            count, steps, model_rates, rounds = args.sd15_requests or 5, (2, 5), sd15_rates, args.sd15_rounds
        else:
            count, steps = args.requests or (16 if args.quick else 24), ((4, 12) if args.quick else (4, 25))
            model_rates, rounds = rates, args.rounds or (1 if args.quick else 2)
        results[model] = bench_model(model, model_rates, count, steps, 64, args.seed, rounds)
        results[model].update(steps=list(steps), requests=count, size=64)
        rows += results[model].pop("rows")
    summary = summarize(rows)
    print("summary:", json.dumps(summary, indent=1))
    out = args.json or Path(__file__).resolve().parent / "results" / "continuous_batching.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    document = {
        "commit": _commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine,
        "models": results,
        "rows": rows,
        "summary": summary,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
