"""Security review, round 2, items 1 and 2: the webhook address filter uses explicit deny-lists (the same answer on
every Python patch release), and a host lookup that hangs has a deadline at create time and before a delivery.

Name resolution is faked (a getaddrinfo that hangs for one made-up host); no connection leaves the machine.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from helpers.webhooks import read_row as _row

from shared.db import Training
from shared.webhooks import (
    MAX_PENDING_LOOKUPS,
    RESOLVE_TIMEOUT_SECONDS,
    ResolutionTimeout,
    check_webhook_url,
    is_allowed_address,
)

# Item 1 ----------------------------------------------------------------------------------------------------

# Every range of the deny-lists, by a few of its addresses; the first four passed on Python 3.11.7 (is_global).
DENIED = [
    "64:ff9b:1::7f00:1",  # local-use NAT64 (64:ff9b:1::/48)
    "::127.0.0.1",  # IPv4-compatible (::/96)
    "fec0::1",  # site-local (fec0::/10)
    "192.0.0.8",  # IETF protocol assignments (192.0.0.0/24)
    # IPv4
    "0.0.0.0", "0.1.2.3",  # 0.0.0.0/8
    "10.0.0.1", "10.255.255.254",  # 10/8
    "100.64.0.1", "100.100.100.200", "100.127.255.254",  # 100.64/10 (cloud metadata among them)
    "127.0.0.1", "127.255.255.254",  # 127/8
    "169.254.0.1", "169.254.169.254",  # 169.254/16
    "172.16.0.1", "172.31.255.254",  # 172.16/12
    "192.0.0.0", "192.0.0.9", "192.0.0.10", "192.0.0.170", "192.0.0.255",  # 192.0.0.0/24
    "192.0.2.1",  # 192.0.2.0/24
    "192.88.99.1",  # 192.88.99.0/24
    "192.168.0.1", "192.168.255.254",  # 192.168/16
    "198.18.0.1", "198.19.255.254",  # 198.18/15
    "198.51.100.7",  # 198.51.100/24
    "203.0.113.9",  # 203.0.113/24
    "224.0.0.1", "239.255.255.250",  # 224/4
    "240.0.0.1", "255.255.255.254",  # 240/4
    "255.255.255.255",  # broadcast
    # IPv6
    "::",  # ::/128
    "::1",  # ::1/128
    "::8.8.8.8", "::10.0.0.1",  # ::/96, whatever it embeds
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:192.0.0.8",  # mapped: the IPv4 decides
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1",  # NAT64: the IPv4 decides
    "64:ff9b:1::808:808", "64:ff9b:1:ffff::1",  # 64:ff9b:1::/48, whatever it embeds
    "100::1", "100::ffff:ffff:ffff:ffff",  # 100::/64
    "2001::1", "2001:0:4136:e378:8000:63bf:80ff:fffe",  # 2001::/23 (Teredo)
    "2001:1::1", "2001:2::1", "2001:3::1", "2001:4:112::1", "2001:10::1", "2001:20::1", "2001:1ff:ffff::1",
    "2001:db8::1", "2001:db8:ffff::1",  # 2001:db8::/32
    "3fff::1", "3fff:fff:ffff::1",  # 3fff::/20 (documentation since 2024; not in the review's list)
    "2002:7f00:1::1", "2002:a00:1::1", "2002:c0a8:101::1", "2002:a9fe:a9fe::1", "2002::1",  # 6to4: the IPv4 decides
    "fc00::1", "fd00::1", "fdff:ffff::1",  # fc00::/7
    "fe80::1", "fe80::1%eth0", "febf:ffff::1",  # fe80::/10
    "fec0::1", "feff:ffff::1",  # fec0::/10
    "ff00::1", "ff02::1", "ff0e::1",  # ff00::/8
    "1000::1", "4000::1", "8000::1", "::ffff:0:808:808",  # outside 2000::/3
]  # fmt: skip
ALLOWED = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.1", "172.32.0.1", "192.0.1.1",
    "198.17.255.255", "198.20.0.1", "223.255.255.254",
    "2606:4700:4700::1111", "2001:4860:4860::8888", "2001:200::1", "2600::1", "3fff:ffff::1",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2002:5db8:d822::1",
]  # fmt: skip


def _url(address: str) -> str:
    return f"http://{address}/hook" if ":" not in address else f"http://[{address.replace('%', '%25')}]/hook"


@pytest.fixture
def no_ipaddress_tables(monkeypatch):
    """The ipaddress module's own classification, whose tables differ between Python releases, is never asked."""

    def refuse(self):
        raise AssertionError("the webhook filter must not use the interpreter's ipaddress tables")

    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for name in ("is_global", "is_private", "is_reserved", "is_multicast", "is_loopback", "is_link_local",
                     "is_unspecified", "is_site_local", "ipv4_mapped", "sixtofour", "teredo"):  # fmt: skip
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, property(refuse))


@pytest.mark.parametrize("address", DENIED)
def test_special_purpose_addresses_are_denied(address, no_ipaddress_tables):
    assert not is_allowed_address(address), address
    with pytest.raises(ValueError, match="non-public address"):
        check_webhook_url(_url(address))
    check_webhook_url(_url(address), allow_private=True)  # the setting still allows them


@pytest.mark.parametrize("address", ALLOWED)
def test_global_unicast_addresses_pass(address, no_ipaddress_tables):
    assert is_allowed_address(address), address
    check_webhook_url(_url(address))


def test_deny_lists_are_what_the_review_listed():
    from shared import webhooks

    v4 = {str(net) for net in webhooks._DENIED_V4}
    assert v4 == {
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
        "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
        "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    }  # fmt: skip
    v6 = {str(net) for net in webhooks._DENIED_V6}
    assert v6 == {
        "::/128", "::1/128", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
        "fe80::/10", "fec0::/10", "ff00::/8",
        "3fff::/20",  # added: documentation prefix of RFC 9637
    }  # fmt: skip


# Item 2 ----------------------------------------------------------------------------------------------------

HUNG_HOST = "hangs.resolver.test"


@pytest.fixture
def hanging_dns(monkeypatch):
    """getaddrinfo that hangs (until the test ends, at most 60 s) for HUNG_HOST and answers 93.184.216.34 for
    ok.resolver.test; ``lookups`` counts the calls for HUNG_HOST."""
    release = threading.Event()
    real = socket.getaddrinfo
    state = {"lookups": 0}

    def getaddrinfo(host, port, *args, **kwargs):
        if host == HUNG_HOST:
            state["lookups"] += 1
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "test: the resolver gave up")
        if host == "ok.resolver.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield state
    release.set()
    deadline = time.monotonic() + 10
    while any(t.name == "webhook-dns" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def _dns_threads() -> int:
    return sum(t.name == "webhook-dns" for t in threading.enumerate())


def test_a_hung_lookup_gives_up_at_the_deadline(hanging_dns):
    start = time.monotonic()
    with pytest.raises(ResolutionTimeout, match=r"could not be resolved within 0\.5 s"):
        check_webhook_url(f"https://{HUNG_HOST}/hook", resolve_timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 0.5 + 1.0, elapsed
    assert hanging_dns["lookups"] == 1
    check_webhook_url("https://ok.resolver.test/hook", resolve_timeout=0.5)  # a resolver that answers is unaffected


def test_hung_lookups_hold_a_bounded_number_of_threads(hanging_dns):
    before = _dns_threads()
    start = time.monotonic()
    for _ in range(MAX_PENDING_LOOKUPS + 4):
        with pytest.raises(ResolutionTimeout):
            check_webhook_url(f"http://{HUNG_HOST}/x", resolve_timeout=0.05)
    # Each call waited its own deadline at most; the extra calls found no free slot and started no thread.
    assert time.monotonic() - start < (MAX_PENDING_LOOKUPS + 4) * 0.05 + 2.0
    assert _dns_threads() - before <= MAX_PENDING_LOOKUPS
    assert hanging_dns["lookups"] <= MAX_PENDING_LOOKUPS


def test_create_answers_422_within_the_deadline(api, hanging_dns):
    """The gateway's check at create time: 422 invalid_webhook_url naming the deadline, after RESOLVE_TIMEOUT_SECONDS
    (plus slack), and nothing is stored."""
    for path, kwargs in (
        ("/v1/generations", {"json": {"prompt": "x", "webhook_url": f"https://{HUNG_HOST}/hook"}}),
        ("/v1/batches", {"json": {"generations": [{"prompt": "x", "webhook_url": f"https://{HUNG_HOST}/h"}]}}),
    ):
        start = time.monotonic()
        response = api.client.post(path, headers=api.headers(), **kwargs)
        elapsed = time.monotonic() - start
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_webhook_url"
        assert f"could not be resolved within {RESOLVE_TIMEOUT_SECONDS:g} s" in error["message"]
        assert RESOLVE_TIMEOUT_SECONDS <= elapsed < RESOLVE_TIMEOUT_SECONDS + 2.0, (path, elapsed)
    assert api.enqueuer.sent == []
    assert api.client.get("/v1/generations", headers=api.headers()).json()["data"] == []


def test_a_delivery_with_a_hung_lookup_is_a_retried_failure(hooks_runtime, hanging_dns):
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(webhook_max_attempts=3)
    job, _ = finished_training(rt, f"https://{HUNG_HOST}/hook")
    start = time.monotonic()
    assert deliver_webhook(rt, f"training:{job}") == "retrying"
    elapsed = time.monotonic() - start
    assert elapsed < RESOLVE_TIMEOUT_SECONDS + 2.0, elapsed
    row = _row(rt, Training, job)
    assert row.webhook_state == "pending" and row.webhook_attempts == 1
    assert "could not be resolved within" in row.webhook_last_error
    assert rt.sent and rt.sent[-1][1] == f"training:{job}" and rt.sent[-1][2] > 0  # the next attempt is scheduled
