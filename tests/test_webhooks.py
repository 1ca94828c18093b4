"""Webhooks: targets, per-tenant signatures, pinned connections, deadlines, attempt limits, the webhook worker.

Receivers listen on 127.0.0.1 (allowed by setting where a test needs a delivery to arrive). Name
resolution is faked where a test needs a public answer: no connection ever leaves the machine.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta

import pytest
from helpers.api import wait_for
from helpers.webhooks import read_row
from sqlalchemy import update

from shared.db import Generation, Tenant, Training, utcnow
from shared.settings import Settings
from shared.webhooks import check_webhook_url, is_allowed_address, sign, verify


def test_targets():
    for bad in ("http://127.0.0.1/x", "http://localhost:8080/x", "http://10.1.2.3/", "http://169.254.169.254/",
                "http://[::1]/x", "ftp://example.com/", "http://user:pw@example.com/", "not a url",
                "http://93.184.216.34:99999/"):  # fmt: skip
        with pytest.raises(ValueError):
            check_webhook_url(bad)
    check_webhook_url("http://127.0.0.1:9/x", allow_private=True)
    check_webhook_url("http://93.184.216.34/hook")  # a public literal address needs no DNS
    check_webhook_url("https://[2606:4700:4700::1111]/hook")


@pytest.mark.parametrize(
    "url",
    [
        "http://100.100.100.200/latest/meta-data/",  # a cloud metadata address (shared address space)
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
        "http://192.0.2.1/",  # documentation (TEST-NET-1)
        "http://198.18.0.1/",  # benchmarking
        "http://[fd00::1]/",  # unique local
    ],
)
def test_non_global_addresses_are_refused(url):
    """The finding: these passed an is_private/is_loopback filter. is_global, after unwrapping, refuses them."""
    with pytest.raises(ValueError, match="non-public"):
        check_webhook_url(url)


def test_embedded_ipv4_is_checked():
    assert is_allowed_address("2002:5db8:d822::1")  # 6to4 of 93.184.216.34: global
    assert not is_allowed_address("2002:a00:1::1")  # 6to4 of 10.0.0.1


def test_signature_round_trip():
    body = b'{"type": "training.succeeded"}'
    header = sign(body, "secret")
    assert verify(body, header, "secret")
    assert not verify(body + b" ", header, "secret")
    assert not verify(body, header, "other")
    assert not verify(body, sign(body, "secret", timestamp=1), "secret")  # too old


def _make_due(rt, model, job_id):
    with rt.sessions() as session:
        session.execute(
            update(model).where(model.id == job_id).values(webhook_next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def test_each_tenant_signs_with_its_own_secret(hooks_runtime, receiver):
    from shared.tenants import rotate_webhook_secret
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True)
    hook = receiver()
    job_a, tenant_a = finished_training(rt, hook.url)
    job_b, tenant_b = finished_training(rt, hook.url)
    assert tenant_a.webhook_secret != tenant_b.webhook_secret
    assert deliver_webhook(rt, f"training:{job_a}") == "delivered"
    assert deliver_webhook(rt, f"training:{job_a}") == "skipped"  # delivered once only
    assert deliver_webhook(rt, f"training:{job_b}") == "delivered"
    (a, b) = hook.received
    assert verify(a["body"], a["signature"], tenant_a.webhook_secret)
    assert not verify(a["body"], a["signature"], tenant_b.webhook_secret)  # B cannot forge or check A's
    assert verify(b["body"], b["signature"], tenant_b.webhook_secret)
    assert not verify(b["body"], b["signature"], tenant_a.webhook_secret)
    event = json.loads(a["body"])
    assert event["type"] == "training.succeeded" and event["data"]["id"] == job_a
    assert read_row(rt, Training, job_a).webhook_state == "delivered"
    # Rotation: later deliveries use the new secret, and the old one no longer verifies.
    with rt.sessions() as session:
        new_secret = rotate_webhook_secret(session, session.get(Tenant, tenant_a.id))
        session.commit()
    job_a2, _ = finished_training(rt, hook.url)
    with rt.sessions() as session:  # move the job to tenant A
        session.execute(update(Training).where(Training.id == job_a2).values(tenant_id=tenant_a.id))
        session.commit()
    assert deliver_webhook(rt, f"training:{job_a2}") == "delivered"
    latest = hook.received[-1]
    assert verify(latest["body"], latest["signature"], new_secret)
    assert not verify(latest["body"], latest["signature"], tenant_a.webhook_secret)


def test_rotate_route_and_admin_command(api, tmp_path, capsys):
    response = api.client.post("/v1/webhook-secret/rotate", headers=api.headers())
    assert response.status_code == 200
    secret = response.json()["webhook_secret"]
    assert secret.startswith("whsec_")
    with api.context.sessions() as session:
        from shared.tenants import tenant_for_key

        assert tenant_for_key(session, api.keys["acme"]).webhook_secret == secret
    assert api.client.post("/v1/webhook-secret/rotate").status_code == 401

    from services.cli.main import main

    data_dir = tmp_path / "data"
    assert main(["migrate", "--data-dir", str(data_dir)]) == 0
    assert main(["admin", "create-tenant", "acme", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (first_secret,) = [line for line in lines if line.startswith("whsec_")]
    assert lines[-1].startswith("krona_")
    assert main(["admin", "rotate-webhook-secret", "acme", "--data-dir", str(data_dir)]) == 0
    rotated = capsys.readouterr().out.strip().splitlines()[-1]
    assert rotated.startswith("whsec_") and rotated != first_secret
    assert main(["admin", "rotate-webhook-secret", "nobody", "--data-dir", str(data_dir)]) == 2


def test_admin_create_tenant_prints_a_working_key(tmp_path, capsys):
    from services.cli.main import main
    from shared.db import make_engine, make_session_factory, upgrade_to_head
    from shared.tenants import tenant_for_key

    data_dir = tmp_path / "data"
    assert main(["migrate", "--data-dir", str(data_dir)]) == 0
    assert main(["admin", "create-tenant", "acme", "--data-dir", str(data_dir)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    url = Settings(data_dir=data_dir).resolved_database_url
    upgrade_to_head(url)
    with make_session_factory(make_engine(url))() as session:
        assert tenant_for_key(session, key).name == "acme"
    assert main(["admin", "create-tenant", "acme", "--data-dir", str(data_dir)]) == 2  # taken


class FakeDns:
    """getaddrinfo that answers ``answers[i]`` on the i-th lookup of ``host`` (the last one after that)."""

    def __init__(self, monkeypatch, host: str, answers: list[str]) -> None:
        self.host, self.answers, self.lookups, self.connects = host, answers, 0, []
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection

        def getaddrinfo(name, port, *args, **kwargs):
            if name != host:
                return real_getaddrinfo(name, port, *args, **kwargs)
            address = self.answers[min(self.lookups, len(self.answers) - 1)]
            self.lookups += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

        def create_connection(address, *args, **kwargs):
            self.connects.append(address)
            if address[0] != "127.0.0.1":  # never leave the machine
                raise ConnectionRefusedError(f"test: no connection to {address[0]}")
            return real_connect(address, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)


def test_dns_rebinding_cannot_redirect_a_delivery(hooks_runtime, receiver, monkeypatch):
    """The finding: the host was resolved to check it and again (by httpx) to send. Now once, and the checked
    address is the one connected to."""
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime()  # private targets refused
    hook = receiver()
    url = f"http://hooks.rebind.test:{hook.port}/hook"
    dns = FakeDns(monkeypatch, "hooks.rebind.test", ["93.184.216.34", "127.0.0.1"])
    job, _ = finished_training(rt, url)
    assert deliver_webhook(rt, f"training:{job}") == "retrying"  # the public address refuses (faked)
    assert dns.lookups == 1 and dns.connects == [("93.184.216.34", hook.port)]
    assert hook.received == []
    _make_due(rt, Training, job)
    assert deliver_webhook(rt, f"training:{job}") == "refused"  # the new answer is checked, never connected to
    assert dns.connects == [("93.184.216.34", hook.port)] and hook.received == []
    assert read_row(rt, Training, job).webhook_state == "refused"


def test_pinned_connection_keeps_the_host_name(hooks_runtime, receiver, monkeypatch):
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True)
    hook = receiver()
    dns = FakeDns(monkeypatch, "hooks.local.test", ["127.0.0.1"])
    job, _ = finished_training(rt, f"http://hooks.local.test:{hook.port}/hook?x=1")
    assert deliver_webhook(rt, f"training:{job}") == "delivered"
    assert dns.lookups == 1 and hook.received[0]["host"] == f"hooks.local.test:{hook.port}"


def test_a_trickling_receiver_is_cut_at_the_total_deadline(hooks_runtime, receiver):
    """The finding: per-read timeouts let a receiver sending one byte every 4 s hold a worker ~36 s."""
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True, webhook_timeout_seconds=1.5)
    hook = receiver("trickle")  # 20 bytes of status line at one byte per 0.5 s: 10 s unless cut
    job, _ = finished_training(rt, hook.url)
    assert deliver_webhook(rt, f"training:{job}") == "retrying"
    row = read_row(rt, Training, job)
    assert row.webhook_state == "pending" and "deadline of 1.5 s passed" in row.webhook_last_error
    assert rt.sent and rt.sent[-1][1] == f"training:{job}" and rt.sent[-1][2] > 0  # the next attempt is scheduled


def test_attempts_stop_at_the_limit_in_process(hooks_runtime, receiver):
    from workers.reaper import reap_once
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True, webhook_max_attempts=3)
    hook = receiver("fail")
    job, _ = finished_training(rt, hook.url)
    results = []
    for _ in range(6):
        results.append(deliver_webhook(rt, f"training:{job}"))
        _make_due(rt, Training, job)
        reap_once(rt)
    assert results[:3] == ["retrying", "retrying", "given_up"] and set(results[3:]) == {"skipped"}
    assert len(hook.received) == 3
    row = read_row(rt, Training, job)
    assert row.webhook_state == "given_up" and row.webhook_attempts == 3


# Through real worker processes (PostgreSQL, Redis, SeaweedFS) ------------------------------------------


def _finished_generation(stack, url: str) -> str:
    from shared.tenants import tenant_for_key

    with stack["sessions"]() as session:
        tenant = tenant_for_key(session, stack["headers"]["Authorization"][7:])
        row = Generation(
            tenant_id=tenant.id, prompt="p", width=64, height=64, seed=1, status="succeeded", webhook_url=url,
            webhook_state="waiting", finished_at=utcnow(),
        )  # fmt: skip
        session.add(row)
        session.commit()
        return row.id


def test_a_failing_receiver_gets_exactly_max_attempts(stack, receiver, monkeypatch):
    """The finding: 16 POSTs in 90 s, some at once, with webhook_max_attempts=5. Here duplicate messages and
    eager reapers race the worker's own retries; the receiver still sees exactly max_attempts, one at a time."""
    from shared.queue import WEBHOOK_TASK, celery_app
    from shared.settings import get_settings
    from workers import reaper
    from workers.runtime import build_runtime

    hook = receiver("fail")
    stack["start_worker"]("hooks", "webhooks")
    job = _finished_generation(stack, hook.url)
    app = celery_app()
    for _ in range(5):  # duplicate wake-ups
        app.send_task(WEBHOOK_TASK, args=[f"generation:{job}"], queue="webhooks")
    monkeypatch.setattr(reaper, "WEBHOOK_REAP_AFTER", timedelta(0))  # this process's reaper sends anything due
    rt = build_runtime(get_settings())
    max_attempts = get_settings().webhook_max_attempts
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        reaper.reap_once(rt)
        with stack["sessions"]() as session:
            row = session.get(Generation, job)
            if row.webhook_state == "given_up":
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not given up: {row.webhook_state}, {row.webhook_attempts} attempts")
    for _ in range(10):  # later reaper passes and messages change nothing
        reaper.reap_once(rt)
        app.send_task(WEBHOOK_TASK, args=[f"generation:{job}"], queue="webhooks")
        time.sleep(0.2)
    assert len(hook.received) == max_attempts == 3
    assert hook.max_active == 1
    with stack["sessions"]() as session:
        assert session.get(Generation, job).webhook_attempts == max_attempts


def test_a_slow_receiver_does_not_delay_a_generation(stack, receiver, monkeypatch):
    """The finding: deliveries ran inside the solo inference worker, so a slow receiver held every generation."""
    monkeypatch.setenv("KRONA_WEBHOOK_TIMEOUT_SECONDS", "60")  # the delivery stays in flight during the test
    client, headers = stack["client"], stack["headers"]
    hook = receiver("trickle")
    stack["start_worker"]("infer", "infer")
    stack["start_worker"]("hooks", "webhooks")
    request = {"prompt": "a photo", "steps": 2, "width": 64, "height": 64}
    first = client.post("/v1/generations", headers=headers, json={**request, "webhook_url": hook.url}).json()
    done = lambda b: b["status"] in ("succeeded", "failed")  # noqa: E731
    assert wait_for(client, f"/v1/generations/{first['id']}", headers, done)["status"] == "succeeded"
    deadline = time.monotonic() + 60
    while not hook.received and time.monotonic() < deadline:  # the receiver holds the delivery now
        time.sleep(0.1)
    assert hook.received and hook.active == 1
    second = client.post("/v1/generations", headers=headers, json=request).json()
    assert wait_for(client, f"/v1/generations/{second['id']}", headers, done)["status"] == "succeeded"
    assert hook.active == 1  # the second generation finished while the first's delivery was still held
    with stack["sessions"]() as session:
        assert session.get(Generation, first["id"]).webhook_state == "sending"
    hook.release.set()  # let the delivery end so that the workers stop promptly
