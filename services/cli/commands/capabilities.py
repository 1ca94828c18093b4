"""`krona capabilities`: what the server serves (GET /v1/capabilities)."""

from __future__ import annotations

import argparse

from services.cli.commands import api_command
from services.cli.connection import connect
from services.cli.output import emit, output_format


def register(sub) -> None:
    api_command(sub, "capabilities", show_capabilities)


def show_capabilities(args: argparse.Namespace) -> int:
    """the server's base model, servable factor shapes, limits and defaults

    Examples:
        krona capabilities
        krona capabilities -o json | jq .base_model
    """
    with connect(args) as client:
        emit(client.capabilities(), output_format(args))
    return 0
