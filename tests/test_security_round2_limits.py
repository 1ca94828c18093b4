"""Security round 2 (issue 19, items 4-8 and the low ones): the key is checked before a body is read; a training's
class images, gradient accumulation, resolution and whole cost are bounded and charged; keys and adapters per
tenant are capped; an open progress stream ends when its key is revoked or its tenant deleted; a malformed id or
date never reaches the database."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from helpers.api import image_files, running_training
from helpers.api import set_tenant_limits as _set
from sqlalchemy import select, update

from shared.db import ApiKey, Tenant, Training


def _answer_to_a_huge_upload(base: str, key: str, declared: int = 150 * 1024 * 1024) -> tuple[int, int]:
    """POST /v1/trainings declaring ``declared`` bytes of multipart body, sending only 64 KiB of it; (the status
    the gateway answered with, bytes of body sent). Waits for the answer as long as the server keeps the
    connection open: a server that reads the body first never answers, and the read times out (the test fails)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        head = (
            f"POST /v1/trainings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"--xyz\r\nContent-Disposition: form-data; name=images; filename=a.png\r\n\r\n" + b"\0" * 65536
        sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1]), len(chunk)


def test_the_key_is_checked_before_the_body_is_read(live_gateway):
    """The review: an unauthenticated client made the gateway receive and spool up to 200 MiB before its 401.
    Now the 401 comes after the headers, with 64 KiB of 150 MiB sent; a rate-limited key gets its 429 alike."""
    base, sessions, key = live_gateway
    status, sent = _answer_to_a_huge_upload(base, "krona_not-a-key")
    assert status == 401 and sent < 100_000
    status, _ = _answer_to_a_huge_upload(base, "")
    assert status == 401
    from shared.tenants import tenant_for_key

    with sessions() as session:
        tenant = tenant_for_key(session, key)
        tenant.limits = {"rate_limit_per_second": 0.001, "rate_limit_burst": 1}
        session.commit()
    assert httpx.get(f"{base}/v1/trainings", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    status, _ = _answer_to_a_huge_upload(base, key)
    assert status == 429


def test_training_parameters_that_multiply_its_work_are_capped_per_tenant(api):
    def create(**params) -> httpx.Response:
        data = {"instance_prompt": "a photo of sks dog", "params": json.dumps(params)}
        return api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))

    _set(api, max_class_images=10, max_gradient_accumulation=4, max_train_resolution=256)
    refused = create(steps=5, prior_preservation=True, class_prompt="a photo of a dog", num_class_images=11)
    assert refused.status_code == 422
    assert refused.json()["error"]["details"] == {"param": "num_class_images", "value": 11, "limit": 10}
    assert create(steps=5, gradient_accumulation=5).json()["error"]["details"]["param"] == "gradient_accumulation"
    assert create(steps=5, resolution=264).json()["error"]["details"]["param"] == "resolution"
    # Class images need prior preservation to cost anything: without it the count is not checked.
    assert create(steps=5, num_class_images=10_000).status_code == 202
    with api.context.sessions() as session:
        before = session.scalar(select(Training.id).order_by(Training.created_at.desc()))
    assert before is not None

    # The whole cost: steps x batch x accumulation x 1.5 plus class images, evaluation images, all x area.
    _set(api, max_training_compute=10_000)
    accepted = create(steps=10, resolution=64, gradient_accumulation=4, prior_preservation=True,
                      class_prompt="a photo of a dog", num_class_images=8)  # fmt: skip
    assert accepted.status_code == 202, accepted.text
    with api.context.sessions() as session:
        cost = session.scalar(select(Training.cost).where(Training.id == accepted.json()["id"]))
    assert cost == 10 * 1 * 4 * 2 * 1.5 + 8 * 25  # 64 px: one unit per image-step
    over = create(steps=200, resolution=256, gradient_accumulation=4)
    assert over.status_code == 422 and over.json()["error"]["code"] == "compute_limit"
    assert over.json()["error"]["details"] == {"cost": 200 * 4 * 1.5 * 16, "limit": 10_000}
    evaluated = create(steps=1, resolution=256, evaluate={"prompts": 25, "per_prompt": 4, "steps": 100})
    assert evaluated.status_code == 422 and evaluated.json()["error"]["details"]["cost"] > 10_000


def test_api_keys_per_tenant_are_capped(api):
    _set(api, max_api_keys=3)  # the tenant's first key counts
    created = [api.client.post("/v1/api-keys", headers=api.headers(), json={"name": f"k{i}"}) for i in range(3)]
    assert [c.status_code for c in created] == [201, 201, 409]
    refused = created[-1].json()["error"]
    assert refused["code"] == "api_key_limit" and refused["details"] == {"active": 3, "limit": 3}
    revoked = api.client.delete(f"/v1/api-keys/{created[0].json()['id']}", headers=api.headers())
    assert revoked.status_code in (200, 204)
    assert api.client.post("/v1/api-keys", headers=api.headers(), json={}).status_code == 201


def test_concurrent_key_creates_cannot_pass_the_cap(api):
    _set(api, max_api_keys=5)
    start = threading.Barrier(20)
    statuses: list[int] = []

    def create() -> None:
        start.wait(timeout=60)
        statuses.append(api.client.post("/v1/api-keys", headers=api.headers(), json={}).status_code)

    threads = [threading.Thread(target=create) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses.count(201) == 4 and statuses.count(409) == 16
    tenant_id = _set(api, max_api_keys=5)
    with api.context.sessions() as session:
        active = session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None)))
        assert len(list(active)) == 5


def test_adapters_per_tenant_are_capped_counting_trainings_under_way(api):
    from helpers.api import native_adapter_file as _adapter_file

    _set(api, max_adapters=2)
    upload = api.client.post("/v1/adapters", headers=api.headers(), files={"file": ("a.safetensors", _adapter_file())})
    assert upload.status_code == 201, upload.text
    data = {"instance_prompt": "a photo of sks dog", "params": json.dumps({"steps": 2})}
    assert api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2)).status_code == 202
    again = api.client.post("/v1/adapters", headers=api.headers(), files={"file": ("a.safetensors", _adapter_file())})
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_limit"
    assert again.json()["error"]["details"] == {"adapters": 1, "trainings_active": 1, "limit": 2}
    refused = api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))
    assert refused.status_code == 409


def _stream_until_end(base: str, key: str, training_id: str, opened: threading.Event) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{base}/v1/trainings/{training_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))
                opened.set()
    return events


@pytest.mark.parametrize("how", ["revoke", "delete_tenant"])
def test_an_open_stream_ends_when_its_key_is_revoked_or_its_tenant_deleted(live_gateway, how):
    from shared.tenants import create_api_key, tenant_for_key

    base, sessions, key = live_gateway
    training_id = running_training(sessions, key)
    with sessions() as session:
        tenant = tenant_for_key(session, key)
        tenant_id = tenant.id
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id))
        admin = create_api_key(session, None, role="admin")
        session.commit()
    opened = threading.Event()
    result: list = []
    follower = threading.Thread(target=lambda: result.append(_stream_until_end(base, key, training_id, opened)))
    follower.start()
    assert opened.wait(timeout=120), "the stream never opened"
    admin_headers = {"Authorization": f"Bearer {admin}"}
    if how == "revoke":
        answer = httpx.delete(  # its only key: force=true revokes it all the same
            f"{base}/v1/api-keys/{key_id}", params={"force": "true"}, headers={"Authorization": f"Bearer {key}"}
        )
    else:
        answer = httpx.delete(f"{base}/v1/tenants/{tenant_id}", headers=admin_headers)
    assert answer.status_code in (200, 202, 204), answer.text
    follower.join(timeout=180)
    assert not follower.is_alive(), "the stream kept going"
    events = result[0]
    assert events[0][0] == "progress"
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] in ("unauthorized", "training_not_found")
    with sessions() as session:  # the tenant's rows are gone, so nothing polls them any more
        if how == "delete_tenant":
            assert session.get(Tenant, tenant_id) is None


def test_malformed_ids_and_dates_never_reach_the_database(api):
    """On PostgreSQL a NUL byte in a query parameter fails the query; every id is checked first (404 for a path
    id, like any id that is not the tenant's; 422 for a list filter), and far-off dates answer 400."""
    headers = api.headers()
    for path in (
        "/v1/trainings/trn_%00",
        "/v1/adapters/adp_abc%00def",
        "/v1/generations/gen_%00/images/0",
        "/v1/batches/bat_%00",
        "/v1/adapters/adp_%00/file",
    ):
        answer = api.client.get(path, headers=headers)
        assert answer.status_code == 404, (path, answer.status_code, answer.text)
    assert api.client.delete("/v1/api-keys/key_%00", headers=headers).status_code == 404
    for name in ("adapter_id", "batch_id"):
        answer = api.client.get("/v1/generations", headers=headers, params={name: "adp_\x00"})
        assert answer.status_code == 422, answer.text
    for params in ({"end": "0001-01-01"}, {"start": "0001-01-01", "end": "0001-01-05"}, {"end": "9999-12-31"}):
        answer = api.client.get("/v1/usage", headers=headers, params=params)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_range", answer.text


def test_a_revoked_keys_stream_check_is_cached_per_key(api):
    """Open streams ask whether their key still works at most every 2 s per key and process (not per stream)."""
    with api.context.sessions() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)))
    assert api.context.key_is_active(key_id)
    with api.context.sessions() as session:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=ApiKey.created_at))
        session.commit()
    assert api.context.key_is_active(key_id)  # cached
    api.context._key_checks[key_id] = (time.monotonic() - 10, True)
    assert not api.context.key_is_active(key_id)
