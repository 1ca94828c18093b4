"""Personalization quality: KronA at the paper's factors vs LoRA rank 4, over a learning-rate sweep.

The comparison of DiffuseKronA's paper (its Table 1 and learning-rate ablation): for every subject (a folder of
images), every method (KronA a1 x a2, PEFT LoRA rank r on the same target layers) and every learning rate, train
an adapter with the project's trainer (`workers.training.train`, the same loop, data and seed for both methods),
generate DreamBooth's evaluation prompts with it and score the images with `shared.eval` (CLIP-I, CLIP-T, DINO);
the base model without an adapter is scored too, as the reference. The table has, per method and learning rate,
the adapter's parameter count and the three scores (means over subjects), and per method the spread of each score
across learning rates (max - min and the population standard deviation): the paper's claim is that KronA is at
least as good with fewer parameters and less sensitive to the learning rate.

    # smoke check on the tiny random models (CPU, about a minute; its numbers mean nothing)
    python benchmarks/quality.py --steps 3 --grad-accum 1 --prompts 2 --per-prompt 1 --sample-steps 2 \
        --json benchmarks/results/quality_smoke.json

    # the paper's comparison (a GPU machine with the models in folders or the Hub cache)
    python benchmarks/quality.py --base /models/sd-1.5 --subjects data/dog data/backpack --class-noun dog backpack \
        --clip /models/clip-vit-large-patch14 --dino /models/dino-vits16 --json quality.json

Defaults are the paper's: 500 steps of 4 accumulated micro-batches, factors (64, 8), LoRA rank 4, learning rates
1e-4, 5e-4, 1e-3, 5e-3, all 25 prompts, 4 images per prompt, 50 sampling steps. Without `--subjects` one synthetic
subject (a coloured toy-like shape on a plain background, drawn from a seed) is made on the fly. On a `tiny-*`
base model, or with `tiny-clip`/`tiny-dino` scorers, every weight is random: the run checks that the whole path
works end to end, and the script prints and records (`"meaningful": false`) that its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("krona", "lora")
METRICS = ("clip_i", "clip_t", "dino")
DEFAULT_LRS = (1e-4, 5e-4, 1e-3, 5e-3)
IDENTIFIER = "sks"
RANDOM_WEIGHTS_NOTE = (
    "tiny random models: every weight (base model, CLIP, DINO) is random, so these numbers MEAN NOTHING; "
    "this run only checks that training, generation and scoring work end to end"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny-sd", help="base model: built-in tiny name, folder or Hub id")
    parser.add_argument("--subjects", nargs="+", default=None, help="subject image folders (default: a synthetic one)")
    parser.add_argument(
        "--class-noun", nargs="+", default=None, help="one class noun for all subjects, or one per subject"
    )
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="krona,lora (default both)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the paper's, 500 SD)")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (paper: 4)")
    parser.add_argument("--a1", type=int, default=64)
    parser.add_argument("--a2", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the same for every run)")
    parser.add_argument("--prompts", type=int, default=None, help="first N evaluation prompts (default: all 25)")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--sample-steps", type=int, default=50, help="sampling steps per image")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--clip", default=None, help="CLIP model (default: tiny-clip on tiny bases, else ViT-L/14)")
    parser.add_argument("--dino", default=None, help="DINO model (default: tiny-dino on tiny bases, else ViT-S/16)")
    parser.add_argument("--no-base-row", action="store_true", help="do not score the base model without adapter")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--work-dir", default=None, help="adapters, images and reports (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def is_tiny(name: str) -> bool:
    from shared.eval.tiny import TINY_EVAL_MODELS
    from shared.models.tiny import TINY_MODELS

    return name in TINY_MODELS or name in TINY_EVAL_MODELS


def quiet_libraries() -> None:
    """No per-load progress bars or "no LoRA keys for the text encoder" warnings between the result lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def make_synthetic_subject(folder: Path, seed: int = 0, count: int = 4, size: int = 128) -> Path:
    """A made-up subject: the same two-coloured shape (a body and a head) on a plain background, shifted and
    scaled a little per image, as DreamBooth's subject photos vary. Deterministic for a seed."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    body, head, background = (rng.integers(0, 256, 3) for _ in range(3))
    yy, xx = np.mgrid[0:size, 0:size]
    for index in range(count):
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = background
        scale = size * rng.uniform(0.22, 0.3)
        cy, cx = size * rng.uniform(0.45, 0.6), size * rng.uniform(0.4, 0.6)
        image[((yy - cy) / scale) ** 2 + ((xx - cx) / (0.8 * scale)) ** 2 <= 1] = body
        hy, hx, hr = cy - 1.1 * scale, cx, 0.5 * scale
        image[(yy - hy) ** 2 + (xx - hx) ** 2 <= hr**2] = head
        Image.fromarray(image).save(folder / f"{index}.png")
    return folder


def write_prompt_file(path: Path, class_noun: str, count: int | None) -> Path:
    """The first ``count`` of DreamBooth's prompt templates for the class (live or object set) in a file."""
    from shared.eval.prompts import prompt_templates

    templates = prompt_templates("default", class_noun)
    if count is not None:
        if not 1 <= count <= len(templates):
            raise ValueError(f"--prompts must be between 1 and {len(templates)}, got {count}")
        templates = templates[:count]
    path.write_text("\n".join(templates) + "\n", encoding="utf-8")
    return path


def train_one(args, spec, images, out: Path) -> dict[str, Any]:
    import torch

    from workers.training import load_components, train

    components = load_components(args.base, device=args.device, mixed_precision=spec.mixed_precision)
    try:
        result = train(spec, components, images, out)
    finally:
        del components
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "adapter_path": str(result.adapter_path),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
    }


def score_one(args, adapter: str | None, subject: Path, class_noun: str, prompts: Path, out: Path) -> dict[str, Any]:
    from shared.eval.run import evaluate, write_report

    report = evaluate(
        base=args.base,
        adapter=adapter,
        images_dir=subject,
        class_noun=class_noun,
        out_dir=out,
        identifier=IDENTIFIER,
        prompts=str(prompts),
        per_prompt=args.per_prompt,
        steps=args.sample_steps,
        guidance_scale=args.guidance,
        clip_model=args.clip,
        dino_model=args.dino,
        device=args.device,
    )
    write_report(report, out / "eval.json")
    return {**{m: report.scores[m] for m in METRICS}, "eval_seconds": round(sum(report.seconds.values()), 2)}


def summarize(runs: list[dict[str, Any]], methods: list[str], lrs: list[float]) -> dict[str, Any]:
    """Per method and learning rate the means over subjects; per method the spread over learning rates."""
    table: list[dict[str, Any]] = []
    spread: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        rows = []
        for lr in lrs:
            picked = [r for r in runs if r["method"] == method and r["lr"] == lr]
            row = {"method": method, "parameters": picked[0]["parameters"], "lr": lr, "subjects": len(picked)}
            row.update({m: statistics.fmean(r[m] for r in picked) for m in METRICS})
            rows.append(row)
        table += rows
        spread[method] = {
            m: {
                "max_minus_min": max(r[m] for r in rows) - min(r[m] for r in rows),
                "std": statistics.pstdev([r[m] for r in rows]),
                "best_lr": max(rows, key=lambda r, m=m: r[m])["lr"],
            }
            for m in METRICS
        }
    base = [r for r in runs if r["method"] == "base"]
    base_row = None
    if base:
        base_row = {"method": "base (no adapter)", "parameters": 0, "lr": None, "subjects": len(base)}
        base_row.update({m: statistics.fmean(r[m] for r in base) for m in METRICS})
    return {"table": table, "base": base_row, "spread_over_lrs": spread}


def format_table(summary: dict[str, Any], meaningful: bool) -> str:
    lines = []
    if not meaningful:
        lines += [f"!!! {RANDOM_WEIGHTS_NOTE} !!!", ""]
    header = f"{'method':<18} {'parameters':>11} {'lr':>8} {'CLIP-I':>8} {'CLIP-T':>8} {'DINO':>8}"
    lines += [header, "-" * len(header)]
    rows = ([summary["base"]] if summary["base"] else []) + summary["table"]
    for row in rows:
        lr = "-" if row["lr"] is None else f"{row['lr']:g}"
        scores = " ".join(f"{row[m]:>8.5f}" for m in METRICS)
        lines.append(f"{row['method']:<18} {row['parameters']:>11,} {lr:>8} {scores}")
    lines += ["", "spread across learning rates (lower = less sensitive to the learning rate)"]
    sub = f"{'method':<18} {'':>11} {'':>8} {'CLIP-I':>8} {'CLIP-T':>8} {'DINO':>8}"
    lines += [sub, "-" * len(sub)]
    for method, spread in summary["spread_over_lrs"].items():
        for key, label in (("max_minus_min", "max-min"), ("std", "std")):
            values = " ".join(f"{spread[m][key]:>8.1e}" for m in METRICS)
            lines.append(f"{method:<18} {'':>11} {label:>8} {values}")
    if not meaningful:
        lines += ["", f"!!! {RANDOM_WEIGHTS_NOTE} !!!"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from shared.eval.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
    from shared.eval.prompts import prompt_data
    from workers.training import TrainingSpec, check_factors_fit_base_model, load_subject_images

    quiet_libraries()
    tiny_base = is_tiny(args.base)
    args.clip = args.clip or ("tiny-clip" if tiny_base else DEFAULT_CLIP_MODEL)
    args.dino = args.dino or ("tiny-dino" if tiny_base else DEFAULT_DINO_MODEL)
    meaningful = not (tiny_base or is_tiny(args.clip) or is_tiny(args.dino))
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
        raise SystemExit(f"--lrs: give positive learning rates, got {args.lrs!r}")
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}, got {args.methods!r}")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="krona-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.subjects:
        subjects = [Path(s) for s in args.subjects]
        nouns = args.class_noun or []
        if len(nouns) == 1:
            nouns = nouns * len(subjects)
        if len(nouns) != len(subjects):
            raise SystemExit("--class-noun: give one class noun for all subjects, or one per subject")
        synthetic = False
    else:
        subjects = [make_synthetic_subject(work / "subjects" / "synthetic-toy", seed=args.seed)]
        nouns = (args.class_noun or ["toy"])[:1]
        synthetic = True

    # Everything checked before any model loads: specs, factors against the UNet config, subject images.
    def spec_for(method: str, lr: float, noun: str) -> TrainingSpec:
        return TrainingSpec(
            instance_prompt=f"a photo of {IDENTIFIER} {noun}",
            steps=args.steps,
            learning_rate=lr,
            a1=args.a1,
            a2=args.a2,
            gradient_accumulation=args.grad_accum,
            seed=args.seed,
            method=method,
            lora_rank=args.rank,
        )

    parameters = {m: check_factors_fit_base_model(spec_for(m, lrs[0], nouns[0]), args.base) for m in methods}
    subject_images = [load_subject_images(s) for s in subjects]
    if not meaningful:
        print(f"!!! {RANDOM_WEIGHTS_NOTE} !!!")
    print(
        f"base {args.base}; {len(subjects)} subject(s); methods {', '.join(methods)} "
        f"({', '.join(f'{m}: {n:,} params' for m, n in parameters.items())}); lrs {', '.join(f'{x:g}' for x in lrs)}"
    )

    runs: list[dict[str, Any]] = []
    for s_index, (subject, noun, images) in enumerate(zip(subjects, nouns, subject_images, strict=True)):
        label = "synthetic toy" if synthetic else str(subject)
        subject_dir = work / f"s{s_index:02d}-{subject.name}"
        subject_dir.mkdir(parents=True, exist_ok=True)
        prompts = write_prompt_file(subject_dir / "prompts.txt", noun, args.prompts)
        if not args.no_base_row:
            scores = score_one(args, None, subject, noun, prompts, subject_dir / "base")
            runs.append({"subject": label, "class_noun": noun, "method": "base", "lr": None, **scores})
            print(f"  {subject.name} base: " + ", ".join(f"{m} {scores[m]:.4f}" for m in METRICS), flush=True)
        for method in methods:
            for lr in lrs:
                name = f"{method}-lr{lr:g}"
                trained = train_one(args, spec_for(method, lr, noun), images, subject_dir / f"{name}.safetensors")
                scores = score_one(args, trained["adapter_path"], subject, noun, prompts, subject_dir / name)
                runs.append(
                    {
                        "subject": label,
                        "class_noun": noun,
                        "method": method,
                        "parameters": parameters[method],
                        "lr": lr,
                        **trained,
                        **scores,
                    }
                )
                print(
                    f"  {subject.name} {name}: loss {trained['first_loss']:.4f} -> {trained['last_loss']:.4f} "
                    f"({trained['train_seconds']:.1f} s), " + ", ".join(f"{m} {scores[m]:.4f}" for m in METRICS),
                    flush=True,
                )

    summary = summarize(runs, methods, lrs)
    print()
    print(format_table(summary, meaningful))
    seconds = time.perf_counter() - started
    print(f"\n{len(runs)} runs in {seconds:.0f} s; adapters, images and per-run reports under {work}")

    if args.json:
        import torch

        result = {
            "benchmark": "quality",
            "meaningful": meaningful,
            "note": RANDOM_WEIGHTS_NOTE
            if not meaningful
            else "real weights: KronA vs LoRA as in DiffuseKronA's Table 1 and learning-rate ablation",
            "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "settings": {
                "base": args.base,
                "subjects": [str(s) for s in subjects] if not synthetic else ["synthetic toy (made on the fly)"],
                "class_nouns": nouns,
                "identifier": IDENTIFIER,
                "methods": methods,
                "a1": args.a1,
                "a2": args.a2,
                "lora_rank": args.rank,
                "learning_rates": lrs,
                "training_steps": args.steps if args.steps is not None else "paper default (500 SD / 1000 SDXL)",
                "gradient_accumulation": args.grad_accum,
                "seed": args.seed,
                "prompts": args.prompts if args.prompts is not None else "all",
                "prompts_source": prompt_data()["source"],
                "per_prompt": args.per_prompt,
                "sample_steps": args.sample_steps,
                "guidance_scale": args.guidance,
                "clip_model": args.clip,
                "dino_model": args.dino,
            },
            "parameters": parameters,
            **summary,
            "runs": [{k: v for k, v in r.items() if k != "adapter_path"} for r in runs],
            "seconds": round(seconds, 1),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                "torch_threads": torch.get_num_threads(),
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
