"""The `krona` subcommands, one module per group (as diffusers' commands/): each module's ``register(sub)`` adds
its parser and subcommands and points each at its handler (``set_defaults(handler=…)``). Modules import their
heavy dependencies inside the handlers, so `krona --help` stays fast and loads no torch."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from services.cli.connection import CliError

__all__ = ["MODULES", "HelpFormatter", "add_group", "add_leaf"]

# In the order `krona --help` lists them.
MODULES = (
    "service",  # up, demo, gateway, worker, migrate
    "trainings",
    "adapters",
    "generations",
    "batches",
    "api_keys",
    "usage",
    "webhook_secret",
    "capabilities",
    "tenants",
    "admin",
    "local",  # train, generate, eval, inspect, export, import, count, models
)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose, keeps indented lines (examples, lists) as written, and states each option's default when the
    help text does not."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines) or paragraph.rstrip().endswith(":"):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))  # fmt: skip
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, True, argparse.SUPPRESS, [], "") or not action.option_strings
        if quiet or "default" in text or action.help == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_group(sub, name: str, help: str, description: str | None = None, aliases: Sequence[str] = ()):
    """A command group (``krona trainings``) and the subparsers action for its subcommands."""
    parser = sub.add_parser(
        name, help=help, description=description or help, formatter_class=HelpFormatter, aliases=list(aliases)
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    return parser, actions


def add_leaf(sub, name: str, help: str, examples: Sequence[str], description: str | None = None, **kwargs):
    """A command with help text, a description and examples (shown under `--help`)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(
        name,
        help=help,
        description=description or (help[0].upper() + help[1:] + "."),
        epilog=epilog,
        formatter_class=HelpFormatter,
        **kwargs,
    )


def note(message: str) -> None:
    """A message about what happened: stderr, so that stdout holds only the resource."""

    print(message, file=sys.stderr, flush=True)


def add_list_options(parser: argparse.ArgumentParser, *, statuses: bool = False) -> None:
    group = parser.add_argument_group("listing")
    if statuses:
        group.add_argument(
            "--status",
            choices=("queued", "running", "canceling", "succeeded", "failed", "canceled"),
            help="only this status",
        )
    group.add_argument("--limit", type=int, default=20, metavar="N", help="show the newest N")
    group.add_argument("--all", action="store_true", help="show every one (fetches every page)")
    group.add_argument("--cursor", metavar="CURSOR", help="start at this page (the next_cursor of a previous list)")


def list_resources(fetch_page, args: argparse.Namespace) -> dict:
    """``{"data": [...], "next_cursor": ...}`` of the newest ``--limit`` (or ``--all``) resources, fetched page by
    page with ``fetch_page(limit=, cursor=)``."""

    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    items: list = []
    cursor = args.cursor
    while True:
        want = 100 if args.all else min(100, args.limit - len(items))
        page = fetch_page(limit=want, cursor=cursor)
        items.extend(page.data)
        cursor = page.next_cursor
        if not cursor or (not args.all and len(items) >= args.limit):
            return {"data": items, "next_cursor": cursor}
