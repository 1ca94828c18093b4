"""The web console's server side (issue 25): the static files at /console with their Content-Security-Policy, and
the admin-only /v1/operator routes its operator pages read (queues, workers by their leases, usage per tenant,
recent failures). The browser itself is driven in tests/test_console_browser.py.

The `api` fixture's database is the test session's, shared with other tests, so every assertion here is about this
test's own tenants and rows (the operator routes count every tenant's)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from helpers.api import Api
from sqlalchemy import delete, select

from services.gateway.routes.console import ASSETS, CONSOLE_DIR, CONTENT_SECURITY_POLICY
from shared.db import Adapter, ApiKey, Evaluation, Generation, Training, utcnow
from shared.tenants import create_api_key, hash_key
from shared.usage import Usage, new_record

OPERATOR_PATHS = ("/v1/operator/queues", "/v1/operator/workers", "/v1/operator/usage", "/v1/operator/failures")


def _admin_headers(api: Api) -> dict[str, str]:
    with api.context.sessions() as session:
        key = create_api_key(session, None, name="console-test", role="admin")
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def _tenant_ids(api: Api) -> dict[str, str]:
    with api.context.sessions() as session:
        return {
            name: session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
            for name, key in api.keys.items()
        }


def _tenant_names(api: Api, admin: dict[str, str]) -> dict[str, str]:
    rows = api.client.get("/v1/tenants", headers=admin, params={"limit": 100}).json()["data"]
    return {row["id"]: row["name"] for row in rows}


@pytest.fixture
def rows(api):
    """Adds rows for the test (``rows.add(row)``) and deletes them afterwards, so that no queued or running job of
    this test is left in the shared database for another test's worker or reaper."""

    class Rows:
        def __init__(self) -> None:
            self.added: list[tuple[type, list]] = []

        def add(self, *new):
            with api.context.sessions() as session:
                for row in new:
                    session.add(row)
                session.commit()
                ids = [row.id for row in new]
            self.added.append((type(new[0]), ids))
            return ids

    keeper = Rows()
    yield keeper
    with api.context.sessions() as session:
        for model, ids in reversed(keeper.added):
            session.execute(delete(model).where(model.id.in_(ids)))
        session.commit()


def _training(tenant_id: str, status: str, **extra) -> Training:
    return Training(
        tenant_id=tenant_id, base_model="tiny-sd", instance_prompt="a photo of sks dog", status=status, **extra
    )


def _generation(tenant_id: str, status: str, **extra) -> Generation:
    return Generation(tenant_id=tenant_id, prompt="x", width=64, height=64, seed=0, status=status, **extra)


def _adapter(tenant_id: str) -> Adapter:
    return Adapter(
        tenant_id=tenant_id, base_model="tiny-sd", num_parameters=1, size_bytes=1, sha256="0" * 64, storage_key="k"
    )


# Who may read them -----------------------------------------------------------------------------------------


def test_operator_routes_need_an_admin_key(api):
    for path in OPERATOR_PATHS:
        assert api.client.get(path).status_code == 401, path
        refused = api.client.get(path, headers=api.headers())
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required", path
    admin = _admin_headers(api)
    for path in OPERATOR_PATHS:
        answer = api.client.get(path, headers=admin)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["Cache-Control"] == "no-store" and "RateLimit-Remaining" in answer.headers


def test_the_operator_routes_are_in_the_openapi_document_with_their_answers(api):
    document = api.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in zip(
        OPERATOR_PATHS, ("QueuesReport", "WorkersReport", "OperatorUsageReport", "FailuresReport"), strict=True
    ):
        operation = document["paths"][path]["get"]
        assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"
        }
        assert {"401", "403", "429"} <= set(operation["responses"]), path
        assert operation["security"], path
    assert set(schemas["QueueDepth"]["required"]) >= {"queue", "queued", "running", "kinds", "tenants"}
    limit = next(p for p in document["paths"]["/v1/operator/failures"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 100
    # The console's own routes serve files, not API: they stay out of the document.
    assert not any(path.startswith("/console") for path in document["paths"])


# Queues -------------------------------------------------------------------------------------------------------


def test_queues_count_queued_and_running_jobs_per_queue_kind_and_tenant(api, rows):
    tenants = _tenant_ids(api)
    acme, globex = tenants["acme"], tenants["globex"]
    admin = _admin_headers(api)
    long_ago = utcnow() - timedelta(hours=2)
    rows.add(
        _training(acme, "queued", created_at=long_ago),
        _training(acme, "queued"),
        _training(acme, "running", lease_owner="host:1:a", lease_expires_at=utcnow() + timedelta(minutes=1)),
        _training(globex, "succeeded"),
    )
    (adapter_id,) = rows.add(_adapter(acme))
    rows.add(Evaluation(tenant_id=acme, adapter_id=adapter_id, base_model="tiny-sd", status="queued"))
    rows.add(
        _generation(globex, "queued"),
        _generation(globex, "queued"),
        _generation(globex, "queued"),
        _generation(globex, "running"),
        _generation(acme, "failed"),
    )
    body = api.client.get("/v1/operator/queues", headers=admin).json()
    queues = {q["queue"]: q for q in body["queues"]}
    assert list(queues) == ["train", "infer"]
    train, infer = queues["train"], queues["infer"]
    assert [k["kind"] for k in train["kinds"]] == ["training", "evaluation"]
    assert [k["kind"] for k in infer["kinds"]] == ["generation"]
    for queue in (train, infer):  # the totals are the sums of the kinds
        assert queue["queued"] == sum(k["queued"] for k in queue["kinds"])
        assert queue["running"] == sum(k["running"] for k in queue["kinds"])
    per_tenant = {q: {t["tenant_id"]: t for t in queues[q]["tenants"]} for q in queues}
    names = _tenant_names(api, admin)
    assert per_tenant["train"][acme] == {"tenant_id": acme, "tenant_name": names[acme], "queued": 3, "running": 1}
    assert globex not in per_tenant["train"]  # its training ended
    assert per_tenant["infer"][globex] == {"tenant_id": globex, "tenant_name": names[globex], "queued": 3, "running": 1}
    assert acme not in per_tenant["infer"]  # a failed generation is neither queued nor running
    # The oldest queued training waited two hours (or another test's older one, longer).
    training = next(k for k in train["kinds"] if k["kind"] == "training")
    assert training["queued"] >= 2 and training["running"] >= 1
    assert training["oldest_queued_seconds"] >= 2 * 3600 - 60
    assert train["oldest_queued_seconds"] >= training["oldest_queued_seconds"]


# Workers ------------------------------------------------------------------------------------------------------


def test_workers_are_the_owners_of_the_leases_of_running_jobs(api, rows):
    tenants = _tenant_ids(api)
    admin = _admin_headers(api)
    now = utcnow()
    live, stale = "gpu-node-7:4242:c0ffee01", "gpu-node-9:77:deadbeef"
    rows.add(
        _training(tenants["acme"], "running", lease_owner=live, lease_expires_at=now + timedelta(seconds=90)),
        _training(tenants["globex"], "running", lease_owner=stale, lease_expires_at=now - timedelta(minutes=5)),
        # A lease left on an ended job is not a worker at work.
        _training(tenants["acme"], "succeeded", lease_owner="gone:1:00000000", lease_expires_at=now),
    )
    rows.add(
        _generation(tenants["acme"], "running", lease_owner=live, lease_expires_at=now + timedelta(seconds=30)),
        _generation(tenants["globex"], "running", lease_owner=live, lease_expires_at=now + timedelta(seconds=60)),
    )
    body = api.client.get("/v1/operator/workers", headers=admin).json()
    workers = {w["owner"]: w for w in body["workers"]}
    assert "gone:1:00000000" not in workers
    seen = workers[live]
    assert (seen["host"], seen["pid"], seen["queues"], seen["jobs"]) == ("gpu-node-7", 4242, ["train", "infer"], 3)
    assert seen["kinds"] == {"training": 1, "generation": 2}
    assert seen["lease_live"] is True
    assert abs(_seconds_between(seen["lease_expires_at"], now) - 90) < 2  # the latest of its leases
    assert workers[stale]["lease_live"] is False and workers[stale]["queues"] == ["train"]


def _seconds_between(iso: str, moment) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(iso.replace("Z", "+00:00")) - moment).total_seconds()


# Usage --------------------------------------------------------------------------------------------------------


def test_usage_per_tenant_totals_each_tenants_jobs_over_the_range(api, rows):
    tenants = _tenant_ids(api)
    admin = _admin_headers(api)
    records = [
        new_record(tenants["acme"], "training", "trn_x", "succeeded", Usage(12.5, "cpu", steps=500)),
        new_record(tenants["acme"], "training", "trn_y", "failed", Usage(2.5, "cpu", steps=20)),
        new_record(tenants["acme"], "generation", "gen_x", "succeeded", Usage(1.0, "cpu", images=2, steps=50)),
        new_record(tenants["globex"], "generation", "gen_y", "succeeded", Usage(4.0, "cuda:H100", images=4)),
    ]
    rows.add(*records)
    today = utcnow().date().isoformat()
    body = api.client.get("/v1/operator/usage", headers=admin, params={"start": today, "end": today}).json()
    assert (body["start"], body["end"]) == (today, today)
    mine = {(e["tenant_id"], e["kind"]): e for e in body["data"] if e["tenant_id"] in tenants.values()}
    names = _tenant_names(api, admin)
    training = mine[(tenants["acme"], "training")]
    assert (training["jobs"], training["worker_seconds"], training["steps"]) == (2, 15.0, 520)
    assert training["tenant_name"] == names[tenants["acme"]] and training["devices"] == {"cpu": 15.0}
    assert mine[(tenants["globex"], "generation")]["images"] == 4
    assert len(mine) == 3
    seconds = [e["worker_seconds"] for e in body["data"]]
    assert seconds == sorted(seconds, reverse=True)  # the most worker time first
    # The default range is the last 30 days, today included; a range the usage routes refuse is a 400.
    default = api.client.get("/v1/operator/usage", headers=admin).json()
    assert default["end"] == today and (tenants["acme"], "training") in {
        (e["tenant_id"], e["kind"]) for e in default["data"]
    }
    for params in ({"start": "2026-02-01", "end": "2026-01-01"}, {"start": "2020-01-01", "end": "2026-01-01"}):
        refused = api.client.get("/v1/operator/usage", headers=admin, params=params)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_range", params
    assert api.client.get("/v1/operator/usage", headers=admin, params={"start": "yesterday"}).status_code == 422


# Failures -----------------------------------------------------------------------------------------------------


def test_failures_list_the_latest_failed_jobs_of_every_kind_with_their_errors(api, rows):
    tenants = _tenant_ids(api)
    admin = _admin_headers(api)
    # Later than anything another test finished, so that they are the newest failures.
    soon = utcnow() + timedelta(days=1)
    (training_id,) = rows.add(
        _training(
            tenants["acme"],
            "failed",
            error_code="out_of_memory",
            error_message="CUDA out of memory",
            attempts=3,
            finished_at=soon + timedelta(seconds=1),
        )
    )
    (generation_id, _) = rows.add(
        _generation(
            tenants["globex"],
            "failed",
            error_code="adapter_unsupported",
            error_message="a1=32 is not served",
            attempts=1,
            finished_at=soon + timedelta(seconds=3),
        ),
        _generation(tenants["globex"], "succeeded", finished_at=soon + timedelta(seconds=4)),
    )
    (adapter_id,) = rows.add(_adapter(tenants["acme"]))
    (evaluation_id,) = rows.add(
        Evaluation(
            tenant_id=tenants["acme"],
            adapter_id=adapter_id,
            base_model="tiny-sd",
            status="failed",
            error_code="storage_unavailable",
            error_message="x" * 5000,
            finished_at=soon + timedelta(seconds=2),
        )
    )
    body = api.client.get("/v1/operator/failures", headers=admin, params={"limit": 3}).json()
    assert [(f["kind"], f["id"]) for f in body["data"]] == [
        ("generation", generation_id),
        ("evaluation", evaluation_id),
        ("training", training_id),
    ]
    names = _tenant_names(api, admin)
    generation, evaluation, training = body["data"]
    assert generation["error"] == {"code": "adapter_unsupported", "message": "a1=32 is not served"}
    assert (generation["tenant_id"], generation["tenant_name"]) == (tenants["globex"], names[tenants["globex"]])
    assert training["attempts"] == 3 and training["error"]["code"] == "out_of_memory"
    assert len(evaluation["error"]["message"]) == 2000  # long messages are cut
    only = api.client.get("/v1/operator/failures", headers=admin, params={"kind": "training", "limit": 1}).json()
    assert [f["id"] for f in only["data"]] == [training_id]
    for params in ({"limit": 101}, {"limit": 0}, {"kind": "webhook"}):
        assert api.client.get("/v1/operator/failures", headers=admin, params=params).status_code == 422, params


# The console's files ------------------------------------------------------------------------------------------


def test_the_console_is_served_from_the_repository_with_its_security_headers(api):
    moved = api.client.get("/console", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["Location"] == "console/"
    page = api.client.get("/console/")
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    for directive in ("default-src 'self'", "img-src 'self' blob: data:", "connect-src 'self'", "frame-ancestors"):
        assert directive in CONTENT_SECURITY_POLICY
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["Referrer-Policy"] == "no-referrer"
    assert '<script type="module" src="js/main.js">' in page.text
    script = api.client.get("/console/js/main.js")
    assert script.status_code == 200 and script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert script.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    again = api.client.get("/console/js/main.js", headers={"If-None-Match": script.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert api.client.head("/console/console.css").status_code == 200
    for missing in ("/console/nope.js", "/console/../app.py", "/console/%2e%2e/routes/console.py", "/console/js"):
        answer = api.client.get(missing)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", missing
    # Browsers ask every origin for /favicon.ico (on /docs, /healthz, ...): the console's icon, not a 404.
    icon = api.client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["Content-Type"] == "image/svg+xml" and b"<svg" in icon.content


def test_the_console_loads_nothing_from_elsewhere_and_every_module_it_imports_is_served():
    """No CDN, no runtime download: every URL in the files is relative; the module graph from main.js is whole;
    no inline script or style (the CSP would block them)."""
    texts = {name: (CONSOLE_DIR / name).read_text(encoding="utf-8") for name in ASSETS if not name.endswith(".png")}
    for name, text in texts.items():
        for found in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)|url\(([^)]+)\)|from\s+["']([^"']+)["']""", text):
            url = next(part for part in found if part)
            assert not re.match(r"^(https?:)?//", url), f"{name} loads {url}"
    html = texts["index.html"]
    assert "<style" not in html and " style=" not in html and not re.search(r"<script(?![^>]*\bsrc=)", html)
    seen, todo = set(), ["js/main.js"]
    while todo:
        module = todo.pop()
        assert module in ASSETS, f"{module} is imported but not served"
        if module in seen:
            continue
        seen.add(module)
        folder = module.rsplit("/", 1)[0]
        for target in re.findall(r"""^import\s[^;]*?from\s+["'](\.[^"']+)["']""", texts[module], flags=re.M | re.S):
            parts = f"{folder}/{target}".split("/")
            resolved: list[str] = []
            for part in parts:
                if part == "..":
                    resolved.pop()
                elif part not in (".", ""):
                    resolved.append(part)
            todo.append("/".join(resolved))
    assert {"js/api.js", "js/pages/operator.js", "js/pages/trainings.js"} <= seen
    # Every API path the console calls is one of the public v1 API.
    for name in seen:
        for path in re.findall(r"""["'`](/[a-z][^"'`$?]*)""", texts[name]):
            assert path.startswith("/v1/"), f"{name} calls {path}"
    # The key is kept in session storage only, never in local storage or a cookie.
    everything = "\n".join(texts.values())
    assert "localStorage" not in everything and "document.cookie" not in everything
