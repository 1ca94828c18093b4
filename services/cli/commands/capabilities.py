"""`krona capabilities`: what the server serves (GET /v1/capabilities)."""

from __future__ import annotations

import argparse

from services.cli.commands import add_leaf
from services.cli.connection import add_connection_options, connect
from services.cli.output import add_output_option, emit, output_format


def register(sub) -> None:
    capabilities = add_leaf(
        sub,
        "capabilities",
        "the server's base model, servable factor shapes, limits and defaults",
        ["krona capabilities", "krona capabilities -o json | jq .base_model"],
    )
    add_connection_options(capabilities)
    add_output_option(capabilities)
    capabilities.set_defaults(handler=show_capabilities)


def show_capabilities(args: argparse.Namespace) -> int:
    with connect(args) as client:
        emit(client.capabilities(), output_format(args))
    return 0
