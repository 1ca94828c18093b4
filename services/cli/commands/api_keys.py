"""`krona api-keys …`: the tenant's own API keys (POST/GET/DELETE /v1/api-keys)."""

from __future__ import annotations

import argparse

from services.cli.commands import Resource, api_command, note
from services.cli.connection import connect
from services.cli.output import emit, output_format

KEYS = Resource("api_keys", "api_key", "KEY_ID", "key_")


def register(sub) -> None:
    """the tenant's API keys: create, list, revoke

    This tenant's API keys. Rotate without downtime: create a new key, switch clients to it, revoke the old.
    """
    actions = KEYS.group(sub, register)
    create = api_command(actions, "create", create_key)
    create.add_argument("--name", help="a label for people")
    KEYS.listing(actions, "the tenant's keys: prefix, name, times (never the key)", ["krona api-keys list"], limit=100)
    KEYS.ending(
        actions,
        "revoke",
        "revoke a key: its next request answers 401",
        "API key {id} revoked",
        id_help="key_… (krona api-keys list)",
    )


def create_key(args: argparse.Namespace) -> int:
    """create an API key (shown once)

    Examples:
        krona api-keys create --name ci
        krona api-keys create -o id
    """
    with connect(args) as client:
        key = client.api_keys.create(args.name)
    fmt = output_format(args)
    if fmt in ("table", "wide"):
        note(f"API key {key.id} created; the key (shown once):")
        print(key.key)
    else:
        emit(key, fmt, "api_key")
    return 0
