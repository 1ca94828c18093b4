"""Webhook targets, signatures and the one HTTP request a delivery makes.

Targets: http(s) URLs whose host resolves only to global unicast addresses, unless
KRONA_ALLOW_PRIVATE_WEBHOOKS is set. "Global" is decided by explicit deny-lists of the IANA
special-purpose ranges (not ``ipaddress.is_global``, whose tables change between Python patch releases);
IPv4-mapped, NAT64 and 6to4 addresses are judged by the IPv4 address they carry, so that
``[2002:7f00:1::1]`` counts as 127.0.0.1. The gateway checks a URL when the job is created. A delivery
resolves the host once more, checks every answer, and connects to the checked address itself (the Host
header and TLS SNI still carry the name), so a DNS server that answers differently on a later lookup
cannot redirect it. Every lookup has a deadline (RESOLVE_TIMEOUT_SECONDS): a resolver that hangs is a
clear error at create time and a failed attempt, retried later, for a delivery. The request has a
total deadline (a watchdog closes the socket, so a receiver that trickles bytes cannot hold a worker)
and reads at most a few KiB of the answer.

Signatures: ``X-Krona-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed with
the tenant's own webhook secret (``whsec_…``, created with the tenant, shown once, rotatable).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "EVENT_ID_HEADER",
    "RESOLVE_TIMEOUT_SECONDS",
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "USER_AGENT",
    "WEBHOOK_EVENTS",
    "DeliveryError",
    "ResolutionTimeout",
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
# How long a webhook URL's host may take to resolve, at create time (the gateway) and before each delivery (the
# webhook worker). A resolver that hangs longer answers a clear error instead of holding a thread indefinitely.
RESOLVE_TIMEOUT_SECONDS = 3.0
# Lookups still running after their deadline keep their thread (getaddrinfo cannot be interrupted) until the
# system resolver gives up (seconds to tens of seconds); at most this many run at once per process, so hung
# lookups cannot pile up threads. A call that finds every slot taken waits for one until its own deadline.
MAX_PENDING_LOOKUPS = 64

# Explicit tables (IANA special-purpose registries), so that the answer does not depend on the Python patch release:
# ``ipaddress.is_global`` changed between 3.11 releases (3.11.7 calls 192.0.0.8 and fec0::1 global).
_DENIED_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared address space (carrier-grade NAT, cloud metadata such as 100.100.100.200)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata 169.254.169.254)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved
        "255.255.255.255/32",  # limited broadcast
    )
)
_DENIED_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # IPv4-compatible (deprecated)
        "64:ff9b:1::/48",  # local-use NAT64: its translator is a local network's
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo 2001::/32 among them)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637, 2024)
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped: the IPv4 address is what is reached
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: reaches the embedded IPv4 address
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # 6to4: bits 16-48 are an IPv4 address


# Every delivery names itself: the product and the version of its event format, and the event's id (receivers
# dedupe retries on it), as Stripe's and Replicate's do.
USER_AGENT = "Krona-Webhooks/1.0 (+https://github.com/krona/krona#webhooks)"
EVENT_ID_HEADER = "Krona-Event-Id"

# The event types a delivery may carry (``type``), and what a ``webhook_events`` filter may name.
WEBHOOK_EVENTS = (
    "training.succeeded",
    "training.failed",
    "training.canceled",
    "generation.succeeded",
    "generation.failed",
    "generation.canceled",
)


def new_webhook_secret() -> str:
    """A tenant's signing secret: 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _allowed_v4(ip: ipaddress.IPv4Address) -> bool:
    return not any(ip in net for net in _DENIED_V4)


def _allowed_v6(ip: ipaddress.IPv6Address) -> bool:
    if ip in _MAPPED or ip in _NAT64:  # forms that reach an IPv4 address: that address decides
        return _allowed_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in net for net in _DENIED_V6) or ip not in _GLOBAL_UNICAST_V6:
        return False
    if ip in _SIX_TO_FOUR:
        return _allowed_v4(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    return True


def is_allowed_address(address: str) -> bool:
    """True for a global unicast address; false for the special-purpose ranges above.

    IPv4-mapped (``::ffff:a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``) and 6to4 (``2002:AABB:CCDD::``) addresses are
    judged by the IPv4 address they carry; any other IPv6 address outside 2000::/3 is refused. ValueError for
    something that is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return _allowed_v4(ip) if isinstance(ip, ipaddress.IPv4Address) else _allowed_v6(ip)


class ResolutionTimeout(ValueError):
    """The host did not resolve within the deadline: refused at create time, retried by a delivery."""


_lookup_slots = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)


def _reset_lookup_slots() -> None:  # a forked child (a prefork worker) has none of its parent's lookup threads
    global _lookup_slots
    _lookup_slots = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)


os.register_at_fork(after_in_child=_reset_lookup_slots)


# One answer of socket.getaddrinfo: (family, type, proto, canonname, sockaddr); sockaddr[0] is the address.
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


def _getaddrinfo(host: str, port: int, timeout: float) -> list[_AddrInfo]:
    """``socket.getaddrinfo(host, port)`` for TCP, or ResolutionTimeout after ``timeout`` seconds.

    The lookup runs in a daemon thread: a resolver that never answers leaves that thread waiting (it ends when
    the resolver's own timeout does) but not the caller.
    """
    message = f"webhook_url host {host!r} could not be resolved within {timeout:g} s; try again later"
    deadline = time.monotonic() + timeout
    slots = _lookup_slots
    if not slots.acquire(timeout=timeout):  # every slot is held by a lookup that hangs
        raise ResolutionTimeout(message)
    infos: list[_AddrInfo] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            infos.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            errors.append(exc)
        finally:
            slots.release()
            done.set()

    threading.Thread(target=lookup, name="webhook-dns", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise ResolutionTimeout(message)
    if errors:
        raise errors[0]
    return infos


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the one address a delivery connects to."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def resolve_webhook_target(
    url: str, *, allow_private: bool = False, resolve_timeout: float = RESOLVE_TIMEOUT_SECONDS
) -> WebhookTarget:
    """Resolve ``url``'s host once and check every answer; ValueError for a refused or unusable URL.

    ResolutionTimeout (a ValueError) when the host does not resolve within ``resolve_timeout`` seconds.
    """
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
        addresses = [str(ipaddress.ip_address(host))]  # a literal address: nothing to look up
    except ValueError:
        try:
            infos = _getaddrinfo(host, port, resolve_timeout)
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


def check_webhook_url(
    url: str, *, allow_private: bool = False, resolve_timeout: float = RESOLVE_TIMEOUT_SECONDS
) -> None:
    """ValueError unless ``url`` is an http(s) URL whose host resolves, within ``resolve_timeout`` seconds, only to
    allowed addresses."""
    resolve_webhook_target(url, allow_private=allow_private, resolve_timeout=resolve_timeout)


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
