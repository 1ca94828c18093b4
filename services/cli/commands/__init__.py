"""The `krona` subcommands, one module per group (as diffusers' commands/): each module's ``register(sub)`` adds
its parser and subcommands and points each at its handler (``set_defaults(handler=…)``). A command's help,
description and examples are its handler's docstring (``command_doc``; a group's, its ``register``'s), so what
`--help` says stands next to the code that does it. Modules import their heavy dependencies inside the handlers, so
`krona --help` stays fast and loads no torch."""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.cli.connection import CliError, add_connection_options, connect
from services.cli.output import add_output_option, emit, output_format

__all__ = [
    "MODULES",
    "Finish",
    "Handler",
    "HelpFormatter",
    "Resource",
    "add_group",
    "add_leaf",
    "add_list_options",
    "api_command",
    "command_doc",
    "list_resources",
    "note",
]

Handler = Callable[[argparse.Namespace], int]

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


def add_group(sub, name: str, register: Callable[..., Any], aliases: Sequence[str] = ()):
    """A command group (``krona trainings``) and the subparsers action for its subcommands; its help and
    description are ``register``'s docstring's (``command_doc``)."""
    help, description, _ = command_doc(register)
    parser = sub.add_parser(
        name, help=help, description=description or help, formatter_class=HelpFormatter, aliases=list(aliases)
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    return parser, actions


def add_leaf(
    sub,
    name: str,
    handler: Handler | None,
    *,
    help: str | None = None,
    examples: Sequence[str] | None = None,
    description: str | None = None,
    default_example: str | None = None,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A command run by ``handler``, with help text, a description and examples (shown under `--help`): those
    given, else its handler's docstring's (``command_doc``); ``default_example`` where neither has examples."""
    if help is None:
        help, description, examples = command_doc(handler)
    examples = list(examples or ([default_example] if default_example else []))
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = sub.add_parser(
        name,
        help=help,
        description=description or (help[0].upper() + help[1:] + "."),
        epilog=epilog,
        formatter_class=HelpFormatter,
        **kwargs,
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def command_doc(handler: Callable[..., Any] | None) -> tuple[str, str | None, list[str]]:
    """A command's help, description and examples from its handler's docstring, as click takes a command's help
    from its function's: the first paragraph is the one-line help its group's `--help` lists, the paragraphs
    after it (if any) the description `--help` shows (else the help as a sentence), the lines under
    ``Examples:`` the examples, one a line. A group's help is its ``register``'s docstring, read the same way."""
    doc = inspect.getdoc(handler) if handler is not None else None
    if not doc:
        raise TypeError(f"{handler!r}: a command's handler needs a docstring (its help), or pass help=")
    body, _, examples = doc.partition("\nExamples:\n")
    first, _, description = body.strip().partition("\n\n")
    # An example may go on over more indented lines (a shell line that ends in a backslash): they keep it.
    return " ".join(first.split()), description or None, textwrap.dedent(examples).strip("\n").splitlines()


def api_command(
    actions, name: str, handler: Handler, *, admin: bool = False, output: bool = True, **kwargs: Any
) -> argparse.ArgumentParser:
    """A command that talks to the API: ``add_leaf`` with the connection options (``--url``, ``--api-key``,
    ``--data-dir``), ``-o`` unless ``output`` is False (commands that print no resource), and its handler."""
    parser = add_leaf(actions, name, handler, **kwargs)
    add_connection_options(parser, admin=admin)
    if output:
        add_output_option(parser)
    return parser


@dataclass(frozen=True)
class Resource:
    """One API collection as the commands see it (``krona generations get gen_…``): the SDK's attribute, the
    output's kind, its ids; the subcommands that take an id, and the handlers every collection has alike."""

    collection: str  # the SDK client's attribute: "generations"
    kind: str  # the output's kind (its table columns): "generation"
    metavar: str  # "GENERATION_ID"
    prefix: str  # of its ids: "gen_"
    admin: bool = False  # an admin key's collection (tenants)
    follow: Callable[[Any, str], Any] | None = None  # a job's: follow(client, id) to its end, progress on stderr

    def group(self, sub, register: Callable[..., Any]) -> Any:
        """``krona <collection>``: its subparsers action; its help is ``register``'s docstring's."""
        return add_group(sub, self.collection.replace("_", "-"), register)[1]

    def command(
        self, actions, name: str, handler: Handler, *, id_help: str | None = None, **kwargs: Any
    ) -> argparse.ArgumentParser:
        """A subcommand on one resource, ``krona <group> <name> ID``; its example by default:
        ``krona <group> <name> <prefix>…``."""
        group = self.collection.replace("_", "-")
        example = f"krona {group} {name} {self.prefix}…"
        parser = api_command(actions, name, handler, admin=self.admin, default_example=example, **kwargs)
        parser.add_argument("id", metavar=self.metavar, help=id_help or f"{self.prefix}…")
        return parser

    def client(self, args: argparse.Namespace) -> Any:
        return connect(args, admin=self.admin)

    def api(self, client: Any) -> Any:
        return getattr(client, self.collection)

    def show(self, args: argparse.Namespace) -> int:
        """``get``: the resource as the API answers it."""
        with self.client(args) as client:
            emit(self.api(client).get(args.id), output_format(args), self.kind)
        return 0

    def listing(
        self, actions, help: str, examples: Sequence[str], *filters: str, limit: int = 20
    ) -> argparse.ArgumentParser:
        """``krona <group> list``: newest first, ``--limit`` (default ``limit``)/``--all``/``--cursor``, and the
        API's filters of these names (``status`` has its choices; the caller declares the others' options)."""
        parser = api_command(actions, "list", self.lister(*filters), admin=self.admin, help=help, examples=examples)
        add_list_options(parser, statuses="status" in filters, limit=limit)
        return parser

    def lister(self, *filters: str) -> Handler:
        """``list``'s handler: the pages the options ask for, with the API's filters of these names."""

        def list_handler(args: argparse.Namespace) -> int:
            with self.client(args) as client:
                fetch = functools.partial(self.api(client).list_page, **{f: getattr(args, f) for f in filters})
                page = list_resources(fetch, args)
            emit(page, output_format(args), self.kind, page=True)
            return 0

        return list_handler

    def ending(self, actions, name: str, help: str, said: str, **kwargs: Any) -> argparse.ArgumentParser:
        """``delete``, ``revoke``: a subcommand that calls the SDK's method of its name with the id, then says
        ``said`` (``{id}`` in it) on stderr; it prints no resource."""

        def end_handler(args: argparse.Namespace) -> int:
            with self.client(args) as client:
                getattr(self.api(client), name)(args.id)
            note(said.format(id=args.id))
            return 0

        return self.command(actions, name, end_handler, help=help, output=False, **kwargs)

    def acting(self, method: str, said: Callable[[Any], str]) -> Handler:
        """``cancel``: calls the SDK's ``method(id)``, says ``said(answer)`` on stderr and prints the answer."""

        def act_handler(args: argparse.Namespace) -> int:
            with self.client(args) as client:
                answer = getattr(self.api(client), method)(args.id)
            note(said(answer))
            emit(answer, output_format(args), self.kind)
            return 0

        return act_handler

    def follower(self, finish: Finish) -> Handler:
        """``wait``: follow the job to its end, then ``finish`` (what it says, prints and exits with)."""

        def wait_handler(args: argparse.Namespace) -> int:
            started = time.monotonic()
            with self.client(args) as client:
                return finish(client, self._follow(client, args.id), started, args)

        return wait_handler

    def queued(
        self,
        args: argparse.Namespace,
        client: Any,
        job: Any,
        finish: Finish,
        *,
        wait: bool,
        hint: str = "",
    ) -> int:
        """What a ``create`` does once the job is queued: with ``wait``, what ``wait`` does; else prints it and how
        to follow it."""
        if not wait:
            note(f"follow it: krona {self.collection} wait {job.id}{hint}")
            emit(job, output_format(args), self.kind)
            return 0
        started = time.monotonic()
        return finish(client, self._follow(client, job.id), started, args)

    def _follow(self, client: Any, job_id: str) -> Any:
        if self.follow is None:
            raise TypeError(f"{self.collection} are not jobs: nothing to follow")
        return self.follow(client, job_id)


# What a job's `wait` does once it has ended: (client, the job, when the waiting started, args) -> exit status.
Finish = Callable[[Any, Any, float, argparse.Namespace], int]


def note(message: str) -> None:
    """A message about what happened: stderr, so that stdout holds only the resource."""

    print(message, file=sys.stderr, flush=True)


def add_list_options(parser: argparse.ArgumentParser, *, statuses: bool = False, limit: int = 20) -> None:
    group = parser.add_argument_group("listing")
    if statuses:
        group.add_argument(
            "--status",
            choices=("queued", "running", "canceling", "succeeded", "failed", "canceled"),
            help="only this status",
        )
    group.add_argument("--limit", type=int, default=limit, metavar="N", help="show the newest N")
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
