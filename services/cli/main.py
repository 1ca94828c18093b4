"""The `krona` command. Each group of subcommands is a module of services/cli/commands/ that registers itself;
handlers import their heavy dependencies lazily, so `krona --help` is instant and loads no torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from services.cli.commands import MODULES, HelpFormatter
from services.cli.connection import CliError, WaitInterrupted, describe_error

DESCRIPTION = """\
DiffuseKronA (Kronecker-product) adapters for Stable Diffusion, as a service.

  run the service   up, demo, gateway, worker, migrate
  use the service   trainings, adapters, generations, batches, api-keys, usage, webhook-secret, capabilities
  operate it        tenants (with an admin key), admin (on the database)
  no service        train, generate, eval, inspect, export, import, count, models

Client commands talk to --url (default $KRONA_URL, else http://127.0.0.1:8000) with --api-key (default
$KRONA_API_KEY, else the key `krona up` wrote to .krona/api-key). They print a table on a terminal and JSON
when piped (-o table|wide|json|yaml|id). Mistakes and an unreachable server are one line and exit status 2.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krona",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
        epilog='examples:\n  krona up\n  krona trainings create --images photos/ --prompt "a photo of sks toy" '
        "--steps 60 --wait\n  krona trainings create --help",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"services.cli.commands.{name}").register(sub)
    return parser


def _label(args: argparse.Namespace) -> str:
    action = getattr(args, "action", None)
    return f"krona {args.command}" + (f" {action}" if isinstance(action, str) else "")


def _fail(args: argparse.Namespace, message: object, status: int) -> int:
    text = " ".join(str(message).split()) if "\n" in str(message) else str(message)
    print(f"{_label(args)}: error: {text}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return args.handler(args) or 0
    except BrokenPipeError:
        # stdout was closed early (`krona trainings list | head -1`): not an error; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CliError as exc:
        return _fail(args, exc, exc.status)
    except WaitInterrupted as exc:
        print(f"\n{_label(args)}: {exc}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print(f"\n{_label(args)}: interrupted", file=sys.stderr, flush=True)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        # A mistake in what was given: a bad value, a missing file or folder, a name that does not exist.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.strerror}: {exc.filename}"
        return _fail(args, message, 2)
    except Exception as exc:
        described = describe_error(exc)
        if described is None:
            raise
        return _fail(args, *described)


if __name__ == "__main__":
    sys.exit(main())
