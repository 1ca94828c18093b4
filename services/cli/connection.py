"""The server a client command talks to, through the Python SDK (krona_sdk): ``--url``, ``--api-key``,
``--data-dir``, and the one-line errors of every failure."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from shared.errors import ServiceError

__all__ = ["CliError", "WaitInterrupted", "add_connection_options", "connect", "describe_error"]


class CliError(Exception):
    """A mistake of the user's (exit status 2) or, with ``status=1``, a job that did not succeed."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class WaitInterrupted(Exception):
    """Ctrl-C while waiting: the job goes on on the server; the message says how to wait again (exit 130)."""


def add_connection_options(parser: argparse.ArgumentParser, *, admin: bool = False) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        metavar="URL",
        help="the API's base URL (default: $KRONA_URL, else http://127.0.0.1:8000, where `krona up` listens)",
    )
    if admin:
        group.add_argument(
            "--api-key",
            metavar="KEY",
            help="an admin key, from `krona admin create-admin-key` (default: $KRONA_ADMIN_KEY)",
        )
    else:
        group.add_argument(
            "--api-key",
            metavar="KEY",
            help="the tenant's API key (default: $KRONA_API_KEY, else the key `krona up` wrote to <data dir>/api-key)",
        )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the data folder of `krona up`, where its api-key file is (default: $KRONA_DATA_DIR, else .krona)",
    )


def _api_key(args: argparse.Namespace, admin: bool) -> str:
    if getattr(args, "api_key", None):
        return args.api_key
    variable = "KRONA_ADMIN_KEY" if admin else "KRONA_API_KEY"
    if os.environ.get(variable):
        return os.environ[variable]
    if admin:
        raise CliError("no admin key: pass --api-key or set KRONA_ADMIN_KEY (create one: krona admin create-admin-key)")
    data_dir = Path(getattr(args, "data_dir", None) or os.environ.get("KRONA_DATA_DIR") or ".krona")
    key_file = data_dir / "api-key"
    if key_file.is_file():
        return key_file.read_text().strip()
    raise CliError(
        f"no API key: pass --api-key, set KRONA_API_KEY, or run `krona up` (it writes {key_file}); "
        "with another data folder, pass --data-dir"
    )


def connect(args: argparse.Namespace, *, admin: bool = False) -> Any:
    """An SDK client for the command's server and key (``krona_sdk.Client``)."""
    try:
        # lazy: loads httpx, krona_sdk, pydantic
        import krona_sdk
    except ImportError:
        raise CliError(
            "the client commands need the Python SDK: pip install -e sdk/python (make install does)"
        ) from None
    url = getattr(args, "url", None) or os.environ.get("KRONA_URL") or "http://127.0.0.1:8000"
    try:
        return krona_sdk.Client(base_url=url, api_key=_api_key(args, admin))
    except ValueError as exc:
        raise CliError(f"--url: {exc}") from None


def describe_error(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for an SDK error or a service error (admin commands); None for anything else."""

    if isinstance(exc, ServiceError):
        return exc.message, 2
    try:
        # lazy: loads httpx, krona_sdk, pydantic
        import krona_sdk
    except ImportError:
        return None
    if isinstance(exc, krona_sdk.APITimeoutError):
        return f"{exc} (a slow server? try again)", 1
    if isinstance(exc, krona_sdk.APIConnectionError):
        url = getattr(exc, "url", None) or "the server"
        return f"cannot reach {url}: is krona up running? set --url or KRONA_URL", 2
    if isinstance(exc, krona_sdk.WaitTimeoutError):
        return str(exc), 1
    if isinstance(exc, krona_sdk.KronaError):
        status = exc.status or 0
        where = f"HTTP {status}" + (f" {exc.code}" if exc.code else "")
        message = f"{exc.message} ({where})"
        if isinstance(exc, krona_sdk.RateLimited | krona_sdk.ServiceUnavailable) and exc.retry_after is not None:
            message += f"; try again in {exc.retry_after:.0f} s"
        return message, (2 if 400 <= status < 500 else 1)
    return None
