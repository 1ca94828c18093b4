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

    demo = sub.add_parser("demo", help="local adapter demo on the built-in tiny-sd model (no servers, no GPU)")
    demo.add_argument("--out", default="out/demo", help="folder for the demo's files (default: out/demo)")
    demo.add_argument("--base", default="tiny-sd", help="base model: tiny-sd, tiny-sdxl, a folder or a hub id")

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

    models = sub.add_parser("models", help="built-in tiny base models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    path = models_sub.add_parser("path", help="build (once) and print the folder of a built-in model")
    path.add_argument("name", choices=["tiny-sd", "tiny-sdxl"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.cli import commands

    handler = {
        "demo": commands.demo,
        "inspect": commands.inspect,
        "export": commands.export,
        "import": commands.import_lycoris,
        "count": commands.count,
        "models": commands.models,
    }[args.command]
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"krona {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
