"""`krona api-keys …`: the tenant's own API keys (POST/GET/DELETE /v1/api-keys)."""

from __future__ import annotations

import argparse

from services.cli.commands import add_group, add_leaf, list_resources, note
from services.cli.connection import add_connection_options, connect
from services.cli.output import add_output_option, emit, output_format


def register(sub) -> None:
    _, actions = add_group(
        sub,
        "api-keys",
        "the tenant's API keys: create, list, revoke",
        "This tenant's API keys. Rotate without downtime: create a new key, switch clients to it, revoke the old.",
    )
    create = add_leaf(
        actions,
        "create",
        "create an API key (shown once)",
        ["krona api-keys create --name ci", "krona api-keys create -o id"],
    )
    create.add_argument("--name", help="a label for people")
    create.set_defaults(handler=create_key)

    listing = add_leaf(
        actions, "list", "the tenant's keys: prefix, name, times (never the key)", ["krona api-keys list"]
    )
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="show the newest N")
    listing.add_argument("--all", action="store_true", help="every key")
    listing.add_argument("--cursor", metavar="CURSOR", help="start at this page")
    listing.set_defaults(handler=list_keys)

    revoke = add_leaf(actions, "revoke", "revoke a key: its next request answers 401", ["krona api-keys revoke key_…"])
    revoke.add_argument("id", metavar="KEY_ID", help="key_… (krona api-keys list)")
    revoke.set_defaults(handler=revoke_key)

    for parser in actions.choices.values():
        add_connection_options(parser)
        if parser is not revoke:
            add_output_option(parser)


def create_key(args: argparse.Namespace) -> int:
    with connect(args) as client:
        key = client.api_keys.create(args.name)
    fmt = output_format(args)
    if fmt in ("table", "wide"):
        note(f"API key {key.id} created; the key (shown once):")
        print(key.key)
    else:
        emit(key, fmt, "api_key")
    return 0


def list_keys(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = list_resources(client.api_keys.list_page, args)
    emit(page, output_format(args), "api_key", page=True)
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.api_keys.revoke(args.id)
    note(f"API key {args.id} revoked")
    return 0
