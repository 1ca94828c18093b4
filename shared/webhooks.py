"""Webhook targets and signatures.

A target must be http(s) and must not resolve to a loopback, private, link-local or otherwise
non-public address unless KRONA_ALLOW_PRIVATE_WEBHOOKS is set (checked when the job is created and
again right before each delivery, against DNS rebinding). Each delivery carries
``X-Krona-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

__all__ = ["SIGNATURE_HEADER", "check_webhook_url", "sign", "verify"]

SIGNATURE_HEADER = "X-Krona-Signature"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def check_webhook_url(url: str, *, allow_private: bool = False) -> None:
    """ValueError unless ``url`` is an http(s) URL whose host resolves only to allowed addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not contain credentials")
    if allow_private:
        return
    host = parts.hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"webhook_url host {host!r} does not resolve") from None
    blocked = sorted(a for a in addresses if not _is_public(a))
    if blocked:
        raise ValueError(
            f"webhook_url host {host!r} resolves to a non-public address ({blocked[0]}); "
            "loopback, private and link-local targets are refused (KRONA_ALLOW_PRIVATE_WEBHOOKS=1 allows them)"
        )


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The signature header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(body: bytes, header: str, secret: str, tolerance_seconds: int = 300) -> bool:
    """What a receiver does: constant-time check of the signature and the timestamp's age."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance_seconds:
        return False
    expected = sign(body, secret, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
