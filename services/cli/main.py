"""The `krona` command. Subcommands import their heavy dependencies lazily so `krona --help` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krona",
        description="DiffuseKronA (Kronecker-product) adapters for Stable Diffusion.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the service end to end on the embedded stack and tiny-sd (no servers, no GPU)")
    demo.add_argument("--out", default="out/demo", help="folder for the demo's files (default: out/demo)")
    demo.add_argument("--local", action="store_true", help="the adapter-only demo in this process (no service)")
    demo.add_argument("--base", default="tiny-sd", help="with --local: tiny-sd, tiny-sdxl, a folder or a hub id")

    inspect = sub.add_parser("inspect", help="describe an adapter file (native or LyCORIS LoKr)")
    inspect.add_argument("file")
    inspect.add_argument("--layers", action="store_true", help="list every layer with its factor shapes")

    export = sub.add_parser("export", help="convert a native adapter to the kohya/LyCORIS LoKr format")
    export.add_argument("file", help="native Krona adapter (.safetensors)")
    export.add_argument("-o", "--out", required=True, help="output .safetensors path")
    export.add_argument("--format", default="lycoris", choices=["lycoris"], help="target format")

    imp = sub.add_parser("import", help="convert a kohya/LyCORIS LoKr file to a native adapter")
    imp.add_argument("file", help="LyCORIS LoKr file (.safetensors)")
    imp.add_argument("-o", "--out", required=True, help="output native adapter path")
    imp.add_argument("--base-model", default="", help="base model the adapter was trained on (metadata)")

    count = sub.add_parser("count", help="trainable parameters of a KronA adapter on a base model (no weights)")
    count.add_argument("--base", default="sdxl", help="sd15, sd21, sdxl, tiny-sd, tiny-sdxl or a model folder")
    count.add_argument("--a1", type=int, default=64)
    count.add_argument("--a2", type=int, default=8)
    count.add_argument("--targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated module names")

    train = sub.add_parser(
        "train",
        help="DreamBooth-train a KronA adapter on a folder of subject images",
        description="Train only the Kronecker factors of the UNet (text encoders frozen). Defaults are the paper's: "
        "AdamW lr 1e-3 constant (its ablation finds ~6e-4 best; >1e-3 overfits, <1e-4 loses fidelity), "
        "batch 1 x gradient accumulation 4, 500 steps (SD) / 1000 (SDXL), no prior preservation.",
    )
    train.add_argument("--base", required=True, help="tiny-sd, tiny-sdxl, a diffusers folder or a hub id")
    train.add_argument("--images", required=True, help="folder of 1-20 subject images (PNG/JPEG/WebP)")
    train.add_argument("--prompt", required=True, help='instance prompt, e.g. "a photo of sks toy"')
    train.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    train.add_argument("--steps", type=int, help="optimizer steps (default 500 SD, 1000 SDXL)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    train.add_argument("--a1", type=int, default=64, help="rows of A (default 64)")
    train.add_argument("--a2", type=int, default=8, help="columns of A (default 8)")
    train.add_argument("--targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated module names")
    train.add_argument(
        "--method",
        default="krona",
        choices=["krona", "lora"],
        help="krona (default) or lora: PEFT LoRA on the same targets and loop, the baseline to compare with "
        "(a diffusers LoRA file, which krona eval and pipe.load_lora_weights read)",
    )
    train.add_argument("--rank", type=int, default=4, help="LoRA rank with --method lora (default 4; alpha = rank)")
    train.add_argument("--resolution", type=int, help="training size (default: the model's native size)")
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps (default 4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--flip", action="store_true", help="random horizontal flips")
    train.add_argument("--prior-preservation", action="store_true", help="add a class-prior loss")
    train.add_argument("--class-prompt", help='class prompt for prior preservation, e.g. "a photo of a toy"')
    train.add_argument("--num-class-images", type=int, default=50)
    train.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument(
        "--keep-intermediate",
        action="store_true",
        help="keep X@B.T for backward: slightly faster, ~2%% more activation memory than LoRA r4",
    )
    train.add_argument("--8bit-adam", dest="use_8bit_adam", action="store_true", help="needs bitsandbytes")
    train.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    train.add_argument("--checkpoint-dir", help="where checkpoints go (default: <out>.checkpoints)")
    train.add_argument("--resume", metavar="DIR", help="continue from the newest checkpoint in DIR")
    train.add_argument("--validation-prompt", help="prompt for validation images (default: the instance prompt)")
    train.add_argument("--validation-every", type=int, default=0, help="validation images every N steps")
    train.add_argument("--validation-dir", help="write validation images here (default: none)")
    train.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    generate = sub.add_parser("generate", help="generate images with a base model and an optional adapter")
    generate.add_argument("--base", required=True, help="tiny-sd, tiny-sdxl, a diffusers folder or a hub id")
    generate.add_argument("--adapter", help="native Krona or LyCORIS LoKr file")
    generate.add_argument("--scale", type=float, default=1.0, help="adapter scale, 0-2 (default 1)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--out", required=True, help="PNG path; with --num-images N, -0.png … -N.png")
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--steps", type=int, default=25)
    generate.add_argument("--guidance-scale", type=float, default=7.5)
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    evaluate = sub.add_parser(
        "eval",
        help="score an adapter: CLIP-I, CLIP-T and DINO on DreamBooth's prompts",
        description="Generate --per-prompt images for each evaluation prompt (DreamBooth's 25 live-subject prompts "
        "for dogs and cats, its 25 object prompts otherwise) and score them against the subject's real images: "
        "CLIP-I and DINO (mean cosine of image embeddings, generated vs real) and CLIP-T (image vs prompt, the "
        "identifier removed). Image k of every prompt uses seed --seed + k. Writes the images, grid.png and a JSON "
        "report under --out.",
    )
    evaluate.add_argument("--base", required=True, help="tiny-sd, tiny-sdxl, a diffusers folder or a hub id")
    evaluate.add_argument("--adapter", help="native Krona or LyCORIS LoKr file (default: the base model alone)")
    evaluate.add_argument("--scale", type=float, default=1.0, help="adapter scale, 0-2 (default 1)")
    evaluate.add_argument("--images", required=True, help="folder of the subject's real images")
    evaluate.add_argument("--class-noun", required=True, help='the subject\'s class as prompted, e.g. "dog"')
    evaluate.add_argument("--identifier", default="sks", help="the rare token of the instance prompt (default sks)")
    evaluate.add_argument(
        "--prompts",
        default="default",
        help="default (by class), object, live, or a file of templates with {identifier} and {class_noun}",
    )
    evaluate.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    evaluate.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (default 0)")
    evaluate.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model: hub id or folder")
    evaluate.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT model: hub id or folder")
    evaluate.add_argument("--out", default="out/eval", help="folder for images and grid.png (default out/eval)")
    evaluate.add_argument("--json", help="report path (default <out>/eval.json)")
    evaluate.add_argument(
        "--heldout-images", help="subject photos left out of training: adds their held-out denoising loss"
    )
    evaluate.add_argument("--instance-prompt", help='for --heldout-images (default "a photo of <identifier> <class>")')
    evaluate.add_argument("--class-images", help="images of the class: adds their denoising loss (language drift)")
    evaluate.add_argument("--class-prompt", help='for --class-images (default "a photo of a <class>")')
    evaluate.add_argument("--loss-samples", type=int, default=16, help="noise draws per held-out loss (default 16)")
    evaluate.add_argument("--resolution", type=int, help="image size of the held-out loss (default: native)")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda if available)")

    up = sub.add_parser("up", help="run the embedded service: gateway + worker, SQLite, local blobs, tiny-sd")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default=".krona", help="database, broker, blobs and api-key (default .krona)")

    migrate = sub.add_parser(
        "migrate",
        help="bring the database (KRONA_DATABASE_URL or the embedded one) to the schema head, and create the S3 "
        "bucket (KRONA_S3_BUCKET) if it is missing",
    )
    migrate.add_argument("--data-dir", help="embedded data folder (default .krona)")

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    tenant = admin_sub.add_parser(
        "create-tenant", help="create a tenant and print its API key and webhook signing secret once"
    )
    tenant.add_argument("name")
    tenant.add_argument("--data-dir", help="embedded data folder (default .krona; ignored with KRONA_DATABASE_URL)")
    rotate = admin_sub.add_parser(
        "rotate-webhook-secret", help="give a tenant a new webhook signing secret and print it once"
    )
    rotate.add_argument("name")
    rotate.add_argument("--data-dir", help="embedded data folder (default .krona; ignored with KRONA_DATABASE_URL)")
    _add_sweep_command(admin_sub)
    _add_key_and_tenant_commands(admin_sub)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway alone (production: behind a proxy)")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument(
        "--workers", type=int, help="gateway processes (default KRONA_GATEWAY_WORKERS, 1); each has its own threadpool"
    )
    gateway.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # one of --workers N
    gateway.add_argument("--data-dir")

    worker = sub.add_parser(
        "worker",
        help="run a Celery worker for the given queues: train/infer one job at a time, webhooks on a thread pool",
    )
    worker.add_argument(
        "--queues",
        default="train,infer",
        help="train, infer, both (default), or webhooks (deliveries only, KRONA_WEBHOOK_CONCURRENCY at once)",
    )
    worker.add_argument("--data-dir")

    from services.cli.client import build_client_parsers

    build_client_parsers(sub)

    models = sub.add_parser("models", help="built-in tiny base models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    path = models_sub.add_parser("path", help="build (once) and print the folder of a built-in model")
    path.add_argument("name", choices=["tiny-sd", "tiny-sdxl"])
    return parser


def _add_key_and_tenant_commands(admin_sub) -> None:
    """`krona admin` keys, tenants and usage (services/cli/commands.py: admin). TENANT is a name or a ten_… id."""
    data_dir = "embedded data folder (default .krona; ignored with KRONA_DATABASE_URL)"
    admin_key = admin_sub.add_parser(
        "create-admin-key", help="create an admin key (the /v1/tenants routes); shown once"
    )
    admin_key.add_argument("--name", help="a label for people")
    create_key = admin_sub.add_parser("create-key", help="create an API key for a tenant and print it once")
    create_key.add_argument("tenant", metavar="TENANT", help="the tenant's name or id")
    create_key.add_argument("--name", help="a label for people")
    list_keys = admin_sub.add_parser("list-keys", help="a tenant's API keys (prefix, name, times; never the key)")
    list_keys.add_argument("tenant", metavar="TENANT", help="the tenant's name or id")
    revoke = admin_sub.add_parser("revoke-key", help="revoke an API key (its next request answers 401)")
    revoke.add_argument("key_id", metavar="KEY_ID", help="key_… (krona admin list-keys)")
    admin_sub.add_parser("list-tenants", help="every tenant with its weight and limit overrides")
    limits = admin_sub.add_parser(
        "set-limits",
        help="set a tenant's weight and limit overrides (others are kept)",
        description="Set a tenant's fair-share weight and overrides of the server's limits; --clear NAME puts a "
        "limit back to the server's default. Prints the limits in effect.",
    )
    limits.add_argument("tenant", metavar="TENANT", help="the tenant's name or id")
    limits.add_argument("--weight", type=float, help="share of the workers under contention (>0, <=1000; default 1)")
    limits.add_argument("--rate-limit-per-second", type=float, help="requests per second per key (0 = no limit)")
    limits.add_argument("--rate-limit-burst", type=int, help="token bucket size")
    limits.add_argument("--max-queued-jobs", type=int, help="queued trainings + generations (0 = no cap)")
    limits.add_argument("--max-running-jobs", type=int, help="running jobs per queue (0 = no cap)")
    limits.add_argument("--max-generation-compute", type=int, help="width x height x steps x images of one request")
    limits.add_argument(
        "--clear",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        type=lambda name: name.replace("-", "_"),
        choices=[
            "weight",
            "rate_limit_per_second",
            "rate_limit_burst",
            "max_queued_jobs",
            "max_running_jobs",
            "max_generation_compute",
        ],
        help="back to the server's default (weight: back to 1)",
    )
    delete = admin_sub.add_parser("delete-tenant", help="delete a tenant with all its rows and files (no undo)")
    delete.add_argument("tenant", metavar="TENANT", help="the tenant's name or id")
    delete.add_argument("--yes", action="store_true", help="required: confirms the deletion")
    usage = admin_sub.add_parser("usage", help="worker time and work done per tenant and period (a table)")
    usage.add_argument("--tenant", help="one tenant's name or id (default: every tenant)")
    usage.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: 29 days before --end)")
    usage.add_argument("--end", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--granularity", default="day", choices=["day", "month", "total"])
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for parser in (admin_key, create_key, list_keys, revoke, admin_sub.choices["list-tenants"], limits, delete, usage):
        parser.add_argument("--data-dir", help=data_dir)


def _add_sweep_command(admin_sub) -> None:
    """`krona admin sweep` (services/cli/commands.py: admin_sweep)."""
    sweep = admin_sub.add_parser(
        "sweep",
        help="run one retention pass now: purge ended trainings' photos, expire old images, delete orphaned blobs",
    )
    sweep.add_argument("--json", action="store_true", help="print the counts as JSON")
    sweep.add_argument("--data-dir", help="embedded data folder (default .krona; ignored with KRONA_DATABASE_URL)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.cli import client, commands, stack

    handler = {
        "up": stack.up,
        "migrate": stack.migrate,
        "admin": commands.admin,
        "gateway": stack.gateway,
        "worker": stack.worker,
        "trainings": client.trainings,
        "adapters": client.adapters,
        "generations": client.generations,
        "batches": client.batches,
        "demo": commands.demo,
        "inspect": commands.inspect,
        "export": commands.export,
        "import": commands.import_lycoris,
        "count": commands.count,
        "train": commands.train,
        "generate": commands.generate,
        "eval": commands.evaluate,
        "models": commands.models,
    }[args.command]
    if args.command == "admin" and args.admin_command == "sweep":
        handler = commands.admin_sweep
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, KeyError, client.ClientError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"krona {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
