"""`krona webhook-secret rotate`: the tenant's webhook signing secret (POST /v1/webhook-secret/rotate)."""

from __future__ import annotations

import argparse

from services.cli.commands import add_group, api_command, note
from services.cli.connection import connect
from services.cli.output import emit, output_format


def register(sub) -> None:
    """the tenant's webhook signing secret

    The secret that signs this tenant's webhook deliveries (X-Krona-Signature: HMAC-SHA256).
    """
    _, actions = add_group(sub, "webhook-secret", register)
    api_command(actions, "rotate", rotate_secret)


def rotate_secret(args: argparse.Namespace) -> int:
    """replace the signing secret and print the new one (shown once)

    Replace the tenant's webhook signing secret. Deliveries made from now on are signed with the new one; the old one
    stops verifying. The new secret is shown only here.

    Examples:
        krona webhook-secret rotate
        SECRET=$(krona webhook-secret rotate -o json | jq -r .webhook_secret)
    """
    with connect(args) as client:
        secret = client.webhook_secret.rotate()
    fmt = output_format(args)
    if fmt in ("table", "wide", "id"):
        note("new webhook signing secret (shown once; deliveries from now on use it):")
        print(secret.webhook_secret)
    else:
        emit(secret, fmt)
    return 0
