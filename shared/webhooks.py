"""Webhook targets, signatures and the one HTTP request a delivery makes.

Targets: http(s) URLs whose host resolves only to global unicast addresses (``ipaddress.is_global``,
after unwrapping IPv4-mapped, 6to4, Teredo and NAT64 forms, so that ``[2002:7f00:1::1]`` counts as
127.0.0.1), unless KRONA_ALLOW_PRIVATE_WEBHOOKS is set. The gateway checks a URL when the job is
created. A delivery resolves the host once more, checks every answer, and connects to the checked
address itself (the Host header and TLS SNI still carry the name), so a DNS server that answers
differently on a later lookup cannot redirect it. The request has a total deadline (a watchdog
closes the socket, so a receiver that trickles bytes cannot hold a worker) and reads at most a few
KiB of the answer.

Signatures: ``X-Krona-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed with
the tenant's own webhook secret (``whsec_…``, created with the tenant, shown once, rotatable).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "DeliveryError",
    "WebhookTarget",
    "check_webhook_url",
    "is_allowed_address",
    "new_webhook_secret",
    "post",
    "resolve_webhook_target",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Krona-Signature"
SECRET_PREFIX = "whsec_"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def new_webhook_secret() -> str:
    """A tenant's signing secret: 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo server and client, NAT64)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_allowed_address(address: str) -> bool:
    """True for a global unicast address whose embedded IPv4 forms (if any) are global too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates.extend(_embedded_ipv4(ip))
    return all(c.is_global and not c.is_multicast for c in candidates)


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the one address a delivery connects to."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def resolve_webhook_target(url: str, *, allow_private: bool = False) -> WebhookTarget:
    """Resolve ``url``'s host once and check every answer; ValueError for a refused or unusable URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not contain credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("webhook_url has an invalid port") from None
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise ValueError(f"webhook_url host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise ValueError(f"webhook_url host {host!r} does not resolve")
    if not allow_private:
        blocked = [a for a in addresses if not is_allowed_address(a)]
        if blocked:
            raise ValueError(
                f"webhook_url host {host!r} resolves to a non-public address ({blocked[0]}); only global "
                "addresses are accepted (KRONA_ALLOW_PRIVATE_WEBHOOKS=1 allows others)"
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(scheme=parts.scheme, host=host, port=port, path=path, address=addresses[0])


def check_webhook_url(url: str, *, allow_private: bool = False) -> None:
    """ValueError unless ``url`` is an http(s) URL whose host resolves only to allowed addresses."""
    resolve_webhook_target(url, allow_private=allow_private)


class DeliveryError(Exception):
    """The request did not complete: connection refused, TLS failure, deadline passed, malformed answer."""


def post(
    target: WebhookTarget,
    body: bytes,
    headers: dict[str, str],
    *,
    deadline_seconds: float,
    max_response_bytes: int = 4096,
) -> int:
    """POST ``body`` to the checked address of ``target`` within ``deadline_seconds`` in all; the status code.

    The socket goes to ``target.address`` (never resolved again); Host and SNI are ``target.host``.
    A watchdog shuts the socket down at the deadline, whatever the receiver does.
    """
    start = time.monotonic()
    timer: threading.Timer | None = None
    sock: socket.socket | None = None
    try:
        sock = socket.create_connection((target.address, target.port), timeout=deadline_seconds)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)

        def expire(s: socket.socket = sock) -> None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(max(0.0, deadline_seconds - (time.monotonic() - start)), expire)
        timer.daemon = True
        timer.start()
        kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        connection = kind(target.host, target.port, timeout=deadline_seconds)
        connection.sock = sock  # connect() is skipped: the checked address is used, not a new lookup
        connection.request("POST", target.path, body=body, headers={**headers, "Connection": "close"})
        response = connection.getresponse()
        response.read(max_response_bytes)  # the answer's body is not needed; read a little, never all
        status = response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        late = time.monotonic() - start >= deadline_seconds
        reason = f"deadline of {deadline_seconds:g} s passed" if late else f"{exc.__class__.__name__}: {exc}"
        raise DeliveryError(reason) from None
    finally:
        if timer is not None:
            timer.cancel()
        if sock is not None:
            sock.close()
    if time.monotonic() - start >= deadline_seconds:
        raise DeliveryError(f"deadline of {deadline_seconds:g} s passed")
    return status


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
