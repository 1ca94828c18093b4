"""`krona capabilities`: what the server serves (GET /v1/capabilities)."""

from __future__ import annotations

import argparse

from services.cli.commands import api_command
from services.cli.connection import connect
from services.cli.output import emit, output_format


def register(sub) -> None:
    api_command(
        sub,
        "capabilities",
        "the server's base model, servable factor shapes, limits and defaults",
        ["krona capabilities", "krona capabilities -o json | jq .base_model"],
        show_capabilities,
    )


def show_capabilities(args: argparse.Namespace) -> int:
    with connect(args) as client:
        emit(client.capabilities(), output_format(args))
    return 0
