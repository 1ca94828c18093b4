"""The local commands, in this process with no service: `krona train`, `generate`, `eval` (need the worker extras:
torch, diffusers), `inspect`, `export`, `import`, `count`, `models`."""

from __future__ import annotations

import argparse
import hashlib
import warnings
from pathlib import Path

from services.cli.commands import add_leaf
from services.cli.connection import CliError
from services.cli.images import expand_images
from services.cli.output import print_table
from services.cli.params import TRAINING_PARAMS, add_training_options
from shared.eval.prompts import evaluation_prompts
from shared.eval.tiny import resolve_eval_model
from shared.krona.keys import short_name
from shared.models import REFERENCE_UNET_CONFIGS, load_pipeline, resolve_base_model, unet_config

BASE_HELP = "tiny-sd, tiny-sdxl, a diffusers folder or a hub id"


def register(sub) -> None:
    _register_train(sub)
    _register_generate(sub)
    _register_eval(sub)

    _register_file_commands(sub)


def _register_file_commands(sub) -> None:
    inspect = add_leaf(sub, "inspect", inspect_file)
    inspect.add_argument("file", metavar="FILE", help="a native Krona or LyCORIS LoKr .safetensors file")
    inspect.add_argument("--layers", action="store_true", help="list every layer with its factor shapes")

    export = add_leaf(sub, "export", export_file)
    export.add_argument("file", metavar="FILE", help="native Krona adapter (.safetensors)")
    export.add_argument("-o", "--out", required=True, metavar="OUT", help="output .safetensors path")
    export.add_argument("--format", default="lycoris", choices=["lycoris"], help="target format")

    imp = add_leaf(sub, "import", import_file)
    imp.add_argument("file", metavar="FILE", help="LyCORIS LoKr file (.safetensors)")
    imp.add_argument("-o", "--out", required=True, metavar="OUT", help="output native adapter path")
    imp.add_argument("--base-model", default="", metavar="NAME", help="base model it was trained on (metadata)")

    count = add_leaf(sub, "count", count_parameters)
    count.add_argument("--base", default="sdxl", help="sd15, sd21, sdxl, tiny-sd, tiny-sdxl or a model folder")
    count.add_argument("--a1", type=int, default=64, help="rows of A")
    count.add_argument("--a2", type=int, default=8, help="columns of A")
    count.add_argument(
        "--target-modules", default="to_q,to_k,to_v,to_out.0", metavar="NAMES", help="comma-separated module names"
    )
    count.add_argument("--targets", dest="target_modules", help=argparse.SUPPRESS)

    models = sub.add_parser("models", help="built-in tiny base models", description="Built-in tiny base models.")
    models_sub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    path = add_leaf(models_sub, "path", model_path)
    path.add_argument("name", choices=["tiny-sd", "tiny-sdxl"], help="the built-in model")


def _register_train(sub) -> None:
    train = add_leaf(sub, "train", train_adapter)
    train.add_argument("--base", required=True, help=BASE_HELP)
    train.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="1-20 subject photos: a folder, files or a glob"
    )
    train.add_argument(
        "--prompt", "--instance-prompt", dest="prompt", required=True, help='instance prompt, e.g. "a photo of sks toy"'
    )
    train.add_argument("--out", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    add_training_options(train, local=True)
    group = train.add_argument_group("method and precision")
    group.add_argument(
        "--method",
        default="krona",
        choices=["krona", "lora"],
        help="krona or lora: PEFT LoRA on the same targets and loop, the baseline to compare with (a diffusers LoRA "
        "file, which krona eval and pipe.load_lora_weights read)",
    )
    group.add_argument(
        "--lora-rank", type=int, default=4, metavar="R", help="LoRA rank with --method lora (alpha = rank)"
    )
    group.add_argument("--rank", dest="lora_rank", type=int, help=argparse.SUPPRESS)
    group.add_argument("--batch-size", type=int, default=1, metavar="N", help="photos per micro-batch")
    group.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast (GPUs)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    group.add_argument(
        "--keep-intermediate",
        action="store_true",
        help="keep X@B.T for backward: slightly faster, ~2%% more activation memory than LoRA r4",
    )
    group.add_argument(
        "--8bit-adam", dest="use_8bit_adam", action="store_true", help="8-bit AdamW (needs bitsandbytes)"
    )
    group.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    group = train.add_argument_group("checkpoints and validation")
    group.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N", help="checkpoint every N steps (0: never)"
    )
    group.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default: <out>.checkpoints)")
    group.add_argument("--resume", metavar="DIR", help="continue from the newest checkpoint in DIR")
    group.add_argument("--validation-every", type=int, default=0, metavar="N", help="validation images every N steps")
    group.add_argument("--validation-dir", metavar="DIR", help="write validation images here (default: none)")


def _register_generate(sub) -> None:
    generate = add_leaf(sub, "generate", generate_images)
    generate.add_argument("--base", required=True, help=BASE_HELP)
    generate.add_argument("--adapter", metavar="FILE", help="native Krona or LyCORIS LoKr file")
    generate.add_argument("--adapter-scale", type=float, default=1.0, metavar="S", help="adapter strength, 0-2")
    generate.add_argument("--scale", dest="adapter_scale", type=float, help=argparse.SUPPRESS)
    generate.add_argument("--prompt", required=True, help="what to draw")
    generate.add_argument("--negative-prompt", metavar="TEXT", help="what the images should not show")
    generate.add_argument(
        "--out", required=True, metavar="PNG", help="PNG path; with --num-images N: <out>-0.png … <out>-N.png"
    )
    generate.add_argument("--num-images", type=int, default=1, metavar="N", help="images, 1-8")
    generate.add_argument("--steps", type=int, default=25, metavar="N", help="denoising steps")
    generate.add_argument("--guidance-scale", type=float, default=7.5, metavar="G", help="classifier-free guidance")
    generate.add_argument("--width", type=int, metavar="PX", help="multiple of 8 (default: the model's native size)")
    generate.add_argument("--height", type=int, metavar="PX", help="multiple of 8 (default: the model's native size)")
    generate.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    generate.add_argument("--device", help="cpu or cuda (default: cuda if available)")


def _register_eval(sub) -> None:
    evaluate = add_leaf(sub, "eval", evaluate_adapter)
    evaluate.add_argument("--base", required=True, help=BASE_HELP)
    evaluate.add_argument(
        "--adapter", metavar="FILE", help="native Krona or LyCORIS LoKr file (default: the base alone)"
    )
    evaluate.add_argument("--adapter-scale", type=float, default=1.0, metavar="S", help="adapter strength, 0-2")
    evaluate.add_argument("--scale", dest="adapter_scale", type=float, help=argparse.SUPPRESS)
    evaluate.add_argument("--images", required=True, metavar="DIR", help="folder of the subject's real images")
    evaluate.add_argument("--class-noun", required=True, metavar="WORD", help='the subject\'s class, e.g. "dog"')
    evaluate.add_argument("--identifier", default="sks", metavar="WORD", help="the rare token of the instance prompt")
    evaluate.add_argument(
        "--prompts",
        default="default",
        help="default (by class), object, live, or a file of templates with {identifier} and {class_noun}",
    )
    evaluate.add_argument("--per-prompt", type=int, default=4, metavar="N", help="images per prompt")
    evaluate.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5, metavar="G", help="classifier-free guidance")
    evaluate.add_argument("--seed", type=int, default=0, metavar="N", help="seed of each prompt's first image")
    evaluate.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model: hub id or folder")
    evaluate.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT model: hub id or folder")
    evaluate.add_argument("--out", default="out/eval", metavar="DIR", help="folder for images and grid.png")
    evaluate.add_argument("--json", metavar="FILE", help="report path (default <out>/eval.json)")
    evaluate.add_argument(
        "--heldout-images", metavar="DIR", help="subject photos left out of training: adds their held-out loss"
    )
    evaluate.add_argument(
        "--instance-prompt", metavar="PROMPT", help='for --heldout-images (default "a photo of <identifier> <class>")'
    )
    evaluate.add_argument(
        "--class-images", metavar="DIR", help="images of the class: adds their denoising loss (language drift)"
    )
    evaluate.add_argument(
        "--class-prompt", metavar="PROMPT", help='for --class-images (default "a photo of a <class>")'
    )
    evaluate.add_argument("--loss-samples", type=int, default=16, metavar="N", help="noise draws per held-out loss")
    evaluate.add_argument(
        "--resolution", type=int, metavar="PX", help="image size of the held-out loss (default: native)"
    )
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda if available)")


# Handlers ----------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_file(args: argparse.Namespace) -> int:
    """describe an adapter file (native or LyCORIS LoKr)

    Examples:
        krona inspect sks.safetensors --layers
    """
    # lazy: loads torch, numpy, safetensors, …
    from shared.krona import FORMAT, load_adapter
    from shared.krona.io import read_safetensors
    from shared.krona.lycoris import from_lycoris
    from shared.krona.model import group_factors

    path = Path(args.file)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT:
        state_dict, config, metadata = load_adapter(path)
        kind = f"native Krona adapter ({FORMAT})"
    elif any(".lokr_w" in k for k in tensors):
        state_dict, config = from_lycoris(tensors), None
        kind = "kohya/LyCORIS LoKr file"
    else:
        raise ValueError(f"{path} is neither a Krona adapter nor a LyCORIS LoKr file")
    pairs = group_factors(state_dict)
    params = sum(a.numel() + b.numel() for a, b in pairs.values())
    a_shapes = sorted({tuple(a.shape) for a, _ in pairs.values()})
    print(f"file:        {path}")
    print(f"format:      {kind}")
    print(f"size:        {path.stat().st_size:,} bytes, sha256 {_sha256(path)}")
    if config is not None:
        print(
            f"config:      a1={config.a1} a2={config.a2} targets={','.join(config.target_modules)} scale={config.scale}"
        )
        print(f"base model:  {metadata.get('base_model') or '(not recorded)'}")
    print(f"layers:      {len(pairs)}, parameters {params:,}, dtype {next(iter(state_dict.values())).dtype}")
    print(f"A shapes:    {', '.join(f'{a1}x{a2}' for a1, a2 in a_shapes)}")
    if args.layers:
        for layer, (a, b) in sorted(pairs.items()):
            d_out, d_in = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
            print(f"  {layer}: A {tuple(a.shape)} ⊗ B {tuple(b.shape)} -> {d_out}x{d_in}")
    return 0


def export_file(args: argparse.Namespace) -> int:
    """convert a native adapter to the kohya/LyCORIS LoKr format

    Examples:
        krona export sks.safetensors -o sks-lokr.safetensors
    """
    # lazy: loads torch, numpy, safetensors, …
    from safetensors.torch import save_file

    # lazy: loads torch
    from shared.krona import LyCORISCompatibilityWarning, load_adapter, to_lycoris

    state_dict, _config, metadata = load_adapter(args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LyCORISCompatibilityWarning)
        lyco = to_lycoris(state_dict)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        lyco,
        out,
        metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": metadata.get("base_model", "")},
    )
    print(f"wrote {out} ({len(lyco) // 3} LoKr modules, full factors, scale 1)")
    print("loads in ComfyUI, AUTOMATIC1111 and Forge for every factor shape")
    for warning in caught:
        print(f"note: {warning.message}")
    return 0


def import_file(args: argparse.Namespace) -> int:
    """convert a kohya/LyCORIS LoKr file to a native adapter

    Examples:
        krona import lokr.safetensors -o native.safetensors --base-model tiny-sd
    """
    # lazy: loads torch, numpy, safetensors, …
    from shared.krona import KronaConfig, from_lycoris, save_adapter
    from shared.krona.io import read_safetensors
    from shared.krona.model import group_factors

    tensors, _ = read_safetensors(args.file)
    state_dict = from_lycoris(tensors)
    pairs = group_factors(state_dict)
    a_shapes = [tuple(a.shape) for a, _ in pairs.values()]
    # The file's tensor shapes rule; the config records the most common A shape for information.
    a1, a2 = max(set(a_shapes), key=a_shapes.count)
    targets = sorted({short_name(p) for p in pairs})
    config = KronaConfig(a1=a1, a2=a2, target_modules=tuple(targets))
    out = save_adapter(args.out, state_dict, config, {"base_model": args.base_model, "created_by": "krona import"})
    print(f"wrote {out} ({len(pairs)} layers, A shapes {sorted(set(a_shapes))})")
    return 0


def count_parameters(args: argparse.Namespace) -> int:
    """trainable parameters of a KronA adapter on a base model (no weights loaded)

    Examples:
        krona count --base sdxl --a1 64 --a2 4
        krona count --base sd15 --target-modules to_q,to_v
    """
    # lazy: loads torch, numpy, tqdm
    from shared.krona import KronaConfig, count_adapter_parameters, meta_unet, target_layer_shapes

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    config = KronaConfig(a1=args.a1, a2=args.a2, target_modules=targets)
    if args.base in REFERENCE_UNET_CONFIGS:
        unet = REFERENCE_UNET_CONFIGS[args.base]
    else:
        unet = unet_config(resolve_base_model(args.base))
    krona = count_adapter_parameters(unet, config)
    shapes = target_layer_shapes(meta_unet(unet), config)
    lora4 = sum(4 * (d_out + d_in) for d_out, d_in in shapes.values())
    print(f"base {args.base}: {len(shapes)} target layers")
    print(f"KronA a1={args.a1} a2={args.a2}: {krona:,} parameters ({krona * 4 / 2**20:.1f} MiB in float32)")
    print(f"LoRA rank 4 on the same layers: {lora4:,} parameters ({krona / lora4:.2f}x)")
    return 0


def model_path(args: argparse.Namespace) -> int:
    """build (once) and print the folder of a built-in model

    Examples:
        krona models path tiny-sd
    """
    print(resolve_base_model(args.name))
    return 0


# TrainingSpec's fields that `krona train` has options for beyond the API's params (services/cli/params.py).
LOCAL_SPEC_FIELDS = ("batch_size", "mixed_precision", "gradient_checkpointing", "keep_intermediate", "use_8bit_adam",
                     "checkpoint_every", "validation_every", "method", "lora_rank")  # fmt: skip


def _training_fields(args: argparse.Namespace) -> dict:
    """The API's training params as `krona train` has them (its own defaults for those not given)."""
    fields = {name: getattr(args, name) for name, *_ in TRAINING_PARAMS if name != "evaluate" and hasattr(args, name)}
    if "target_modules" in fields:
        fields["target_modules"] = tuple(fields["target_modules"])
    return fields


def _training_bar(total: int):
    """A progress bar of ``total`` steps and the trainer's ``on_progress`` that moves it, with the trainer's loss,
    learning rate and ETA (one ETA: tqdm's own estimate is left out of the bar)."""
    # lazy: loads torch, numpy, safetensors, …
    from tqdm import tqdm

    bar = tqdm(
        total=total, unit="step", desc="training", dynamic_ncols=True, bar_format="{l_bar}{bar}| {n}/{total} {postfix}"
    )

    def on_progress(p) -> None:
        bar.n = p.step
        bar.set_postfix_str(f"loss {p.loss:.4f}, lr {p.learning_rate:g}, ETA {p.eta_seconds:.0f}s", refresh=False)
        bar.refresh()

    return bar, on_progress


def train_adapter(args: argparse.Namespace) -> int:
    """DreamBooth-train a KronA adapter on subject photos, in this process

    Train only the Kronecker factors of the UNet (text encoders frozen). Defaults are the paper's: AdamW learning rate
    1e-3 constant (its ablation finds ~6e-4 best; >1e-3 overfits, <1e-4 loses fidelity), batch 1 x gradient accumulation
    4, 500 steps (SD) / 1000 (SDXL), no prior preservation.

    Examples:
        krona train --base tiny-sd --images photos/ --prompt "a photo of sks toy" --steps 100 --out a.safetensors
        krona train ... --resume a.safetensors.checkpoints      # continue after a crash or Ctrl-C
    """
    # lazy: loads torch, diffusers
    from workers.training import (
        TrainingCanceled,
        TrainingSpec,
        check_factors_fit_base_model,
        load_components,
        load_subject_images,
    )
    from workers.training import train as run_training

    # Everything that can be wrong with the job is checked before the model is loaded.
    local = {name: getattr(args, name) for name in LOCAL_SPEC_FIELDS}
    spec = TrainingSpec(instance_prompt=args.prompt, **_training_fields(args), **local)
    sources = args.images[0] if len(args.images) == 1 and Path(args.images[0]).is_dir() else expand_images(args.images)
    images = load_subject_images(sources)
    n_params = check_factors_fit_base_model(spec, args.base)
    adapter = f"LoRA rank {spec.lora_rank}" if spec.method == "lora" else f"KronA a1={spec.a1} a2={spec.a2}"
    print(f"{len(images)} images, {adapter}: {n_params:,} trainable parameters")
    components = load_components(args.base, device=args.device, mixed_precision=spec.mixed_precision)
    checkpoint_dir = args.resume or args.checkpoint_dir or f"{args.out}.checkpoints"
    bar, on_progress = _training_bar(spec.resolved_steps(components.sdxl))
    try:
        result = run_training(
            spec,
            components,
            images,
            args.out,
            checkpoint_dir=checkpoint_dir,
            resume=bool(args.resume),
            validation_dir=args.validation_dir,
            on_progress=on_progress,
        )
    except TrainingCanceled as exc:
        bar.close()
        print(f"canceled at step {exc.step}; checkpoint {exc.checkpoint}")
        return 1
    except KeyboardInterrupt:
        bar.close()
        raise CliError(
            f"interrupted; continue from the last checkpoint: krona train … --resume {checkpoint_dir}", status=130
        ) from None
    bar.close()
    if result.resumed_from_step:
        print(f"resumed from step {result.resumed_from_step}")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"wrote {result.adapter_path} after {result.steps} steps in {result.seconds:.1f} s (last loss {last:.4f})")
    for image in result.validation_images:
        print(f"validation image {image}")
    return 0


def _check_ranges(args: argparse.Namespace, *bounds: tuple[str, float, float | None]) -> None:
    """Each option ``name`` within [low, high] (no upper bound where high is None); ValueError naming it."""
    for name, low, high in bounds:
        value, option = getattr(args, name), "--" + name.replace("_", "-")
        if high is None and value < low:
            raise ValueError(f"{option} must be at least {low}, got {value}")
        if high is not None and not low <= value <= high:
            raise ValueError(f"{option} must be between {low} and {high}, got {value}")


def generate_images(args: argparse.Namespace) -> int:
    """generate images with a base model and an optional adapter, in this process

    Examples:
        krona generate --base tiny-sd --adapter a.safetensors --prompt "sks toy on the moon" --out moon.png
    """
    _check_ranges(args, ("adapter_scale", 0, 2), ("num_images", 1, 8))
    # lazy: loads torch, numpy, safetensors, …
    import torch

    # lazy: loads torch, PIL
    from shared.images import save_image
    from shared.krona import load_into_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.base, device=device)
    if args.adapter:
        layers = load_into_pipeline(pipe, args.adapter, scale=args.adapter_scale)
        print(f"adapter {args.adapter}: {len(layers)} layers at scale {args.adapter_scale}")
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        width=args.width,
        height=args.height,
        generator=generator,
        output_type="np",
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")
        save_image(image, path)
        print(f"wrote {path} ({image.shape[1]}x{image.shape[0]})")
    return 0


def _check_eval_inputs(args: argparse.Namespace) -> None:
    """What `krona eval` checks before loading any model (the same checks and words as shared.eval.run)."""
    # lazy: loads numpy
    from shared.images import load_subject_images

    _check_ranges(args, ("adapter_scale", 0, 2), ("per_prompt", 1, 16), ("steps", 1, None))
    load_subject_images(args.images)
    evaluation_prompts(args.prompts, identifier=args.identifier, class_noun=args.class_noun)
    if args.adapter and not Path(args.adapter).is_file():
        raise FileNotFoundError(f"no adapter file {args.adapter}")


def _load_scoring_models(args: argparse.Namespace) -> None:
    """Load CLIP and DINO once before anything is generated, so that a model that cannot be had (no hub access,
    a wrong name) fails in seconds, not after the generation; they are cached for the scoring that follows."""
    # lazy: loads torch, numpy, tqdm
    from shared.eval.metrics import ClipEmbedder, DinoEmbedder

    for option, name, embedder in (("--clip", args.clip, ClipEmbedder), ("--dino", args.dino, DinoEmbedder)):
        try:
            model = embedder(resolve_eval_model(name), device="cpu")
        except Exception as exc:  # OSError (not on the hub, offline), ValueError (not such a model), …
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CliError(
                f"{option} {name}: cannot load the scoring model ({reason}); give a local folder, or tiny-clip / "
                "tiny-dino for an offline run (meaningless scores)"
            ) from None
        del model


def evaluate_adapter(args: argparse.Namespace) -> int:
    r"""score an adapter: CLIP-I, CLIP-T and DINO on DreamBooth's prompts, in this process

    Load the scoring models first (CLIP, DINO: a model that cannot be loaded fails here, before anything is
    generated), then generate --per-prompt images for each evaluation prompt (DreamBooth's 25 live-subject prompts
    for dogs and cats, its 25 object prompts otherwise) and score them against the subject's real images: CLIP-I and
    DINO (mean cosine of image embeddings, generated vs real) and CLIP-T (image vs prompt, the identifier removed).
    Image k of every prompt uses seed --seed + k. Writes the images, grid.png and a JSON report under --out.

    Examples:
        krona eval --base B --adapter sks.safetensors --images photos/ --class-noun dog
        krona eval --base tiny-sd --adapter a.safetensors --images photos/ --class-noun toy \
            --clip tiny-clip --dino tiny-dino --per-prompt 1 --steps 2   # offline, meaningless scores
    """
    # lazy: loads torch, numpy, tqdm
    from shared.eval.run import METRICS, evaluate, write_report

    _check_eval_inputs(args)
    loss_sets = _heldout_sets(args)  # checked before anything is generated
    _load_scoring_models(args)
    report = evaluate(
        base=args.base,
        adapter=args.adapter,
        images_dir=args.images,
        class_noun=args.class_noun,
        out_dir=args.out,
        identifier=args.identifier,
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        adapter_scale=args.adapter_scale,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        base_seed=args.seed,
        clip_model=args.clip,
        dino_model=args.dino,
        device=args.device,
    )
    rows = [[r.prompt, *(f"{getattr(r, m):.4f}" for m in METRICS)] for r in report.prompts]
    rows.append(["mean", *(f"{report.scores[m]:.4f}" for m in METRICS)])
    print_table(["prompt", "CLIP-I", "CLIP-T", "DINO"], rows)
    if loss_sets:
        _print_heldout_losses(args, report, loss_sets)
    json_path = Path(args.json) if args.json else Path(args.out) / "eval.json"
    write_report(report, json_path)
    print(f"wrote {json_path} and {report.grid} ({len(report.prompts)} prompts x {report.per_prompt} images)")
    return 0


def _print_heldout_losses(args: argparse.Namespace, report, loss_sets: dict) -> None:
    """The held-out denoising loss of the base and the adapter on each set of --heldout-images, kept in the report."""
    # lazy: loads torch, numpy, safetensors, …
    from workers.training.heldout import heldout_losses

    report.heldout_loss = heldout_losses(
        args.base,
        args.adapter,
        loss_sets,
        adapter_scale=args.adapter_scale,
        resolution=args.resolution,
        seed=args.seed,
        samples=args.loss_samples,
        device=args.device,
    )
    print()
    print_table(
        ["held-out denoising loss", "images", "base", "adapter"],
        [
            [name, r["images"], f"{r['base']:.5f}", f"{r['adapter']:.5f}" if "adapter" in r else "-"]
            for name, r in report.heldout_loss.items()
        ],
    )


def _heldout_sets(args: argparse.Namespace) -> dict:
    """`krona eval`'s held-out loss sets: name -> (decoded images, prompt)."""
    # lazy: loads numpy
    from shared.images import load_subject_images

    sets = {}
    if args.heldout_images:
        prompt = args.instance_prompt or f"a photo of {args.identifier} {args.class_noun}"
        sets["subject (held out)"] = (load_subject_images(args.heldout_images), prompt)
    if args.class_images:
        prompt = args.class_prompt or f"a photo of a {args.class_noun}"
        sets["class"] = (load_subject_images(args.class_images), prompt)
    if sets:
        _check_ranges(args, ("loss_samples", 1, 1024))
    return sets
