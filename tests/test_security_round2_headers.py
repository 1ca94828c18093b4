"""Security review, round 2, items 3 and 4: security headers on every answer, and a /readyz that shows its
details (worker processes, error classes) only to the metrics token or an admin key.
"""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from helpers.api import native_adapter_file, png
from sqlalchemy import update

from shared.db import Generation
from shared.supervision import STATE_FILE
from shared.tenants import create_api_key

# Item 3 ----------------------------------------------------------------------------------------------------


def _assert_headers(response, *, no_store: bool) -> None:
    """nosniff always, exactly once; no-store exactly once where asked, and no other Cache-Control."""
    assert response.headers.get_list("x-content-type-options") == ["nosniff"], response.headers
    cache = response.headers.get_list("cache-control")
    assert cache == (["no-store"] if no_store else []), (response.request.url, response.status_code, cache)
    assert response.headers["x-request-id"]


def test_every_answer_carries_the_security_headers(api):
    client, headers = api.client, api.headers()
    # An authenticated create (the key shown once), and authenticated reads.
    created = client.post("/v1/api-keys", headers=headers, json={"name": "ci"})
    assert created.status_code == 201 and created.json()["key"]
    _assert_headers(created, no_store=True)
    assert created.headers["ratelimit-limit"]  # the rate headers are still added
    _assert_headers(client.get("/v1/trainings", headers=headers), no_store=True)
    # Errors: 401, 404 (of a route, and of no route at all), 405, 422, 413.
    unauthorized = client.get("/v1/trainings")
    assert unauthorized.status_code == 401
    _assert_headers(unauthorized, no_store=True)
    missing = client.get(f"/v1/adapters/adp_{uuid.uuid4().hex[:24]}", headers=headers)
    assert missing.status_code == 404
    _assert_headers(missing, no_store=True)
    for response, status in (
        (client.get("/nowhere"), 404),
        (client.delete("/healthz"), 405),
        (client.post("/v1/generations", headers=headers, json={"prompt": ""}), 422),
        (client.post("/v1/generations", headers={**headers, "Content-Length": str(10**10)}, content=b"x"), 413),
    ):
        assert response.status_code == status, response.text
        _assert_headers(response, no_store=True)
    # Public, cacheable answers: nosniff only.
    for path in ("/healthz", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 200
        _assert_headers(response, no_store=False)
    # Readiness and metrics describe the server: no-store.
    _assert_headers(client.get("/readyz"), no_store=True)
    _assert_headers(client.get("/metrics"), no_store=True)


def test_downloads_carry_the_security_headers(api):
    client, headers = api.client, api.headers()
    generation = client.post("/v1/generations", headers=headers, json={"prompt": "x"}).json()
    key = f"tenants/x/generations/{generation['id']}/0.png"
    api.context.storage.put_bytes(key, png(1))
    with api.context.sessions() as session:
        session.execute(
            update(Generation)
            .where(Generation.id == generation["id"])
            .values(status="succeeded", images=[{"index": 0, "key": key, "seed": 3}])
        )
        session.commit()
    image = client.get(f"/v1/generations/{generation['id']}/images/0", headers=headers)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    _assert_headers(image, no_store=True)
    files = {"file": ("a.safetensors", native_adapter_file(), "application/octet-stream")}
    adapter = client.post("/v1/adapters", headers=headers, files=files).json()
    for fmt in ("krona", "lycoris"):
        download = client.get(f"/v1/adapters/{adapter['id']}/file", headers=headers, params={"format": fmt})
        assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
        _assert_headers(download, no_store=True)


def test_an_unhandled_error_carries_the_headers_too(api):
    """Starlette answers an unhandled exception outside the middleware; RequestContext answers it first."""
    app = api.client.app

    def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/v1/test-boom", boom, methods=["GET"])
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/test-boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    _assert_headers(response, no_store=True)


def test_a_route_cannot_send_its_own_cache_control_on_v1(api):
    from fastapi import Response

    app = api.client.app
    app.add_api_route(
        "/v1/test-cached",
        lambda: Response(b"x", headers={"Cache-Control": "public, max-age=600", "X-Content-Type-Options": "no"}),
        methods=["GET"],
    )
    _assert_headers(api.client.get("/v1/test-cached"), no_store=True)


# Item 4 ----------------------------------------------------------------------------------------------------

PROCESSES = {"worker": {"pid": 4242, "state": "running", "restarts": 3, "last_exit_code": -9}}


@pytest.fixture
def supervised(api):
    """A processes.json as `krona up` writes it, in the gateway's data dir."""
    (api.context.settings.data_dir / STATE_FILE).write_text(json.dumps(PROCESSES))
    return api


def _admin_key(api) -> str:
    with api.context.sessions() as session:
        key = create_api_key(session, None, name=f"ops-{uuid.uuid4().hex[:6]}", role="admin")
        session.commit()
    return key


def test_public_readyz_shows_status_and_names_only(supervised):
    api = supervised
    for headers in ({}, api.headers(), {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic x"}):
        response = api.client.get("/readyz", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_admin_key_sees_the_processes(supervised):
    api = supervised
    response = api.client.get("/readyz", headers={"Authorization": f"Bearer {_admin_key(api)}"})
    assert response.status_code == 200
    assert response.json()["processes"] == PROCESSES


def test_metrics_token_sees_the_processes(app_with, tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(PROCESSES))
    client = app_with(metrics_token="tok-readyz-123")
    assert "processes" not in client.get("/readyz").json()
    assert "processes" not in client.get("/readyz", headers={"Authorization": "Bearer tok-readyz-12"}).json()
    detailed = client.get("/readyz", headers={"Authorization": "Bearer tok-readyz-123"})
    assert detailed.status_code == 200 and detailed.json()["processes"] == PROCESSES


class StorageDown(Exception):
    pass


def test_a_failing_dependency_is_named_without_its_error_class(supervised, monkeypatch):
    api = supervised

    def down():
        raise StorageDown("s3.internal:9000 refused the connection")

    monkeypatch.setattr(api.context.storage, "check", down)
    public = api.client.get("/readyz", headers=api.headers())  # a tenant's key gets the public answer
    assert public.status_code == 503
    error = public.json()["error"]
    assert error["code"] == "not_ready"
    assert error["details"] == {"database": "ok", "broker": "ok", "storage": "error"}
    assert "StorageDown" not in public.text and "s3.internal" not in public.text and "4242" not in public.text
    _assert_headers(public, no_store=True)
    detailed = api.client.get("/readyz", headers={"Authorization": f"Bearer {_admin_key(api)}"})
    assert detailed.status_code == 503
    details = detailed.json()["error"]["details"]
    assert details["storage"] == "error: StorageDown" and details["processes"] == PROCESSES
    assert "s3.internal" not in detailed.text  # the class, never the message (it may hold addresses)
