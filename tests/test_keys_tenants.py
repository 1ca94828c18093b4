"""Keys and tenants (issue 11): a tenant's own API keys, the admin's /v1/tenants routes, `krona admin`."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from helpers.api import Api, RecordingEnqueuer, image_files
from sqlalchemy import func, inspect, select, text

from services.cli.main import main
from shared.db import (
    Adapter,
    ApiKey,
    Evaluation,
    Tenant,
    TenantService,
    UsageRecord,
    make_engine,
    make_session_factory,
)
from shared.tenants import create_api_key, hash_key
from shared.usage import Usage, new_record


def _tenant_id(api: Api, tenant: str = "acme") -> str:
    with api.context.sessions() as session:
        return session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(api.keys[tenant])))


def _admin_headers(api: Api) -> dict[str, str]:
    with api.context.sessions() as session:
        key = create_api_key(session, None, name="ops", role="admin")
        session.commit()
    return {"Authorization": f"Bearer {key}"}


# A tenant's own keys ------------------------------------------------------------------------------------


def test_a_tenant_creates_lists_and_revokes_its_keys_and_a_revoked_key_is_refused_at_once(api):
    created = api.client.post("/v1/api-keys", headers=api.headers(), json={"name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert created.headers["Location"] == f"/v1/api-keys/{body['id']}"
    assert body["key"].startswith("krona_") and body["prefix"] == body["key"][:12] and body["name"] == "ci"
    assert body["revoked_at"] is None and body["last_used_at"] is None
    new_headers = {"Authorization": f"Bearer {body['key']}"}
    unnamed = api.client.post("/v1/api-keys", headers=new_headers)  # no body: a key without a name
    assert unnamed.status_code == 201 and unnamed.json()["name"] is None

    listed = api.client.get("/v1/api-keys", headers=api.headers())
    assert listed.status_code == 200
    data = listed.json()["data"]
    assert [k["id"] for k in data][:2] == [unnamed.json()["id"], body["id"]] and len(data) == 3  # newest first
    assert all(set(k) == {"id", "name", "prefix", "created_at", "last_used_at", "revoked_at"} for k in data)
    with api.context.sessions() as session:
        hashes = list(session.scalars(select(ApiKey.key_hash).where(ApiKey.tenant_id == _tenant_id(api))))
    for secret in (body["key"], unnamed.json()["key"], api.keys["acme"], *hashes):
        assert secret not in listed.text
    assert next(k for k in data if k["id"] == body["id"])["last_used_at"] is not None  # it was used above

    first = api.client.get("/v1/api-keys", headers=api.headers(), params={"limit": 2}).json()
    second = api.client.get("/v1/api-keys", headers=api.headers(), params={"limit": 2, "cursor": first["next_cursor"]})
    assert [k["id"] for k in first["data"] + second.json()["data"]] == [k["id"] for k in data]

    assert api.client.delete(f"/v1/api-keys/{body['id']}", headers=api.headers()).status_code == 204
    refused = api.client.get("/v1/api-keys", headers=new_headers)  # the very next request
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert api.client.delete(f"/v1/api-keys/{body['id']}", headers=api.headers()).status_code == 204  # idempotent
    revoked = next(
        k for k in api.client.get("/v1/api-keys", headers=api.headers()).json()["data"] if k["id"] == body["id"]
    )
    assert revoked["revoked_at"] is not None

    # A key may revoke itself; its next request is refused, the tenant's other keys still work.
    own = api.client.get("/v1/api-keys", headers=api.headers()).json()["data"][-1]["id"]
    assert api.client.delete(f"/v1/api-keys/{own}", headers=api.headers()).status_code == 204
    assert api.client.get("/v1/trainings", headers=api.headers()).status_code == 401
    other = {"Authorization": f"Bearer {unnamed.json()['key']}"}
    assert api.client.get("/v1/trainings", headers=other).status_code == 200


def test_key_bodies_are_checked(api):
    for bad in ({"name": "x" * 101}, {"name": 5}, {"name": ""}, {"name": "a\x00b"}, {"role": "admin"}):
        response = api.client.post("/v1/api-keys", headers=api.headers(), json=bad)
        assert response.status_code == 422, (bad, response.text)
    assert len(api.client.get("/v1/api-keys", headers=api.headers()).json()["data"]) == 1


def test_another_tenants_key_is_404_and_stays_valid(api):
    theirs = api.client.get("/v1/api-keys", headers=api.headers("globex")).json()["data"][0]["id"]
    response = api.client.delete(f"/v1/api-keys/{theirs}", headers=api.headers())
    assert response.status_code == 404 and response.json()["error"]["code"] == "api_key_not_found"
    assert api.client.delete("/v1/api-keys/key_000000000000000000000000", headers=api.headers()).status_code == 404
    assert api.client.get("/v1/trainings", headers=api.headers("globex")).status_code == 200
    mine = {k["id"] for k in api.client.get("/v1/api-keys", headers=api.headers()).json()["data"]}
    assert theirs not in mine and len(mine) == 1


# Admin routes ---------------------------------------------------------------------------------------------


def test_tenant_routes_need_an_admin_key_and_tenant_routes_a_tenant_key(api):
    admin = _admin_headers(api)
    one = f"/v1/tenants/{_tenant_id(api)}"
    for method, path in (
        ("get", "/v1/tenants"),
        ("post", "/v1/tenants"),
        ("get", one),
        ("patch", one),
        ("delete", one),
    ):
        kwargs = {"json": {"name": "nope"}} if method in ("post", "patch") else {}
        response = api.client.request(method, path, headers=api.headers(), **kwargs)
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_key_required", path
        assert api.client.request(method, path, **kwargs).status_code == 401
    assert api.client.get(f"/v1/tenants/{_tenant_id(api)}", headers=api.headers()).status_code == 403
    assert api.client.get("/v1/tenants", headers=admin).status_code == 200
    for path in ("/v1/api-keys", "/v1/trainings", "/v1/adapters"):
        response = api.client.get(path, headers=admin)
        assert response.status_code == 403 and response.json()["error"]["code"] == "tenant_key_required", path
    assert api.client.post("/v1/api-keys", headers=admin).status_code == 403
    with api.context.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id.is_(None))) >= 1
    spec = api.client.get("/openapi.json").json()
    assert "403" in spec["paths"]["/v1/tenants"]["post"]["responses"]
    assert "403" in spec["paths"]["/v1/api-keys"]["get"]["responses"]


def test_an_admin_creates_lists_changes_and_reads_tenants(api):
    admin = _admin_headers(api)
    name = f"initech-{uuid.uuid4().hex[:6]}"
    created = api.client.post(
        "/v1/tenants", headers=admin, json={"name": name, "weight": 2, "limits": {"max_queued_jobs": 5}}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    tenant = body["tenant"]
    assert created.headers["Location"] == f"/v1/tenants/{tenant['id']}"
    assert body["api_key"].startswith("krona_") and body["webhook_secret"].startswith("whsec_")
    assert tenant["name"] == name and tenant["weight"] == 2.0 and tenant["limits"] == {"max_queued_jobs": 5}
    settings = api.context.settings
    assert tenant["effective_limits"]["max_queued_jobs"] == 5
    assert tenant["effective_limits"]["rate_limit_burst"] == settings.rate_limit_burst
    theirs = {"Authorization": f"Bearer {body['api_key']}"}
    assert api.client.get("/v1/api-keys", headers=theirs).status_code == 200  # the first key works

    taken = api.client.post("/v1/tenants", headers=admin, json={"name": name})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "tenant_exists"
    for bad in ({"name": "has space"}, {"name": ""}, {"name": "x" * 101}, {"name": "ok", "weight": 0},
                {"name": "ok", "weight": 1001}, {"name": "ok", "weight": True}, {"name": "ok", "limits": {"nope": 1}},
                {"name": "ok", "limits": {"max_queued_jobs": -1}}, {"name": "ok", "limits": {"rate_limit_burst": "2"}},
                {"name": "ok", "extra": 1}):  # fmt: skip
        response = api.client.post("/v1/tenants", headers=admin, json=bad)
        assert response.status_code == 422, (bad, response.text)
    fetched = api.client.get(f"/v1/tenants/{tenant['id']}", headers=admin)
    assert fetched.status_code == 200 and fetched.json() == tenant
    assert api.client.get("/v1/tenants/ten_000000000000000000000000", headers=admin).json()["error"]["code"] == (
        "tenant_not_found"
    )
    seen, cursor = [], None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/tenants", headers=admin, params=params).json()
        seen += [t["id"] for t in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen[0] == tenant["id"] and len(seen) == len(set(seen)) >= 3 and _tenant_id(api) in seen

    # PATCH: the limits in effect follow at once, and the rate limit bites from the tenant's next request.
    patched = api.client.patch(
        f"/v1/tenants/{tenant['id']}",
        headers=admin,
        json={"weight": 3, "limits": {"rate_limit_per_second": 0.001, "rate_limit_burst": 2}},
    ).json()
    assert patched["weight"] == 3.0
    assert patched["limits"] == {"max_queued_jobs": 5, "rate_limit_per_second": 0.001, "rate_limit_burst": 2}
    assert patched["effective_limits"]["rate_limit_burst"] == 2 and patched["effective_limits"]["max_queued_jobs"] == 5
    statuses = [api.client.get("/v1/api-keys", headers=theirs).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    cleared = api.client.patch(
        f"/v1/tenants/{tenant['id']}", headers=admin, json={"limits": {"rate_limit_per_second": None}}
    ).json()
    assert cleared["limits"] == {"max_queued_jobs": 5, "rate_limit_burst": 2} and cleared["weight"] == 3.0
    rate = settings.rate_limit_per_second
    assert cleared["effective_limits"]["rate_limit_per_second"] == rate
    reset = api.client.patch(f"/v1/tenants/{tenant['id']}", headers=admin, json={"weight": None, "limits": None})
    assert reset.json()["weight"] == 1.0 and reset.json()["limits"] == {}
    assert api.client.patch(f"/v1/tenants/{tenant['id']}", headers=admin, json={}).json() == reset.json()
    for bad in ({"weight": -1}, {"limits": {"max_running_jobs": 1.5}}, {"limits": {"nope": None}}, {"name": "x"}):
        assert api.client.patch(f"/v1/tenants/{tenant['id']}", headers=admin, json=bad).status_code == 422, bad
    missing = api.client.patch("/v1/tenants/ten_000000000000000000000000", headers=admin, json={"weight": 2})
    assert missing.status_code == 404
    with api.context.sessions() as session:
        assert session.get(Tenant, tenant["id"]).limits == {}


# Deleting a tenant: every row and every blob ------------------------------------------------------------


def _populate(api: Api, tenant: str, tenant_id: str) -> None:
    """A row in every table that has a tenant_id, and blobs under the tenant's prefix."""
    headers = api.headers(tenant)
    training = api.client.post(
        "/v1/trainings",
        headers={**headers, "Idempotency-Key": "first"},
        data={"instance_prompt": "a photo of sks dog"},
        files=image_files(2),
    )
    assert training.status_code == 202, training.text
    assert api.client.post("/v1/generations", headers=headers, json={"prompt": "a"}).status_code == 202
    assert api.client.post("/v1/batches", headers=headers, json={"generations": [{"prompt": "b"}]}).status_code == 202
    assert api.client.post("/v1/api-keys", headers=headers, json={"name": "second"}).status_code == 201
    storage = api.context.storage
    storage.put_bytes(f"tenants/{tenant_id}/adapters/adp_0.safetensors", b"adapter")
    storage.put_bytes(f"tenants/{tenant_id}/generations/gen_0/0.png", b"png")
    with api.context.sessions() as session:
        adapter = Adapter(
            tenant_id=tenant_id,
            base_model="tiny-sd",
            config={"a1": 8, "a2": 8, "targets": []},
            num_parameters=1,
            size_bytes=7,
            sha256="0" * 64,
            storage_key=f"tenants/{tenant_id}/adapters/adp_0.safetensors",
        )
        session.add(adapter)
        session.flush()
        session.add(Evaluation(tenant_id=tenant_id, adapter_id=adapter.id, base_model="tiny-sd", params={},
                               reference_keys=[]))  # fmt: skip
        session.merge(TenantService(tenant_id=tenant_id, queue="infer", counter=1.0))
        session.add(new_record(tenant_id, "generation", "gen_0", "succeeded", Usage(1.5, "cpu", images=1)))
        session.commit()


def _rows_by_table(engine, tenant_id: str) -> dict[str, int]:
    """Rows of the tenant in every table of the database that has a tenant_id column (and in tenants)."""
    inspector = inspect(engine)
    counts = {}
    with engine.connect() as conn:
        for table in inspector.get_table_names():
            columns = {c["name"] for c in inspector.get_columns(table)}
            column = "id" if table == "tenants" else "tenant_id" if "tenant_id" in columns else None
            if column is not None:
                query = text(f'SELECT count(*) FROM "{table}" WHERE "{column}" = :tenant')
                counts[table] = conn.execute(query, {"tenant": tenant_id}).scalar()
    return counts


def _blobs(api: Api, tenant_id: str) -> list[str]:
    return list(api.context.storage.list(f"tenants/{tenant_id}/"))


@pytest.fixture
def sqlite_local_api(tiny_folders, tmp_path):
    """The gateway on the embedded SQLite database and local blobs, with two tenants."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.db import upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant

    settings = Settings(data_dir=tmp_path, base_model="tiny-sd")
    upgrade_to_head(settings.resolved_database_url)
    enqueuer = RecordingEnqueuer()
    app = create_app(settings, enqueuer=enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    keys = {}
    with make_session_factory(make_engine(settings.resolved_database_url))() as session:
        for name in ("acme", "globex"):
            _, keys[name] = create_tenant(session, name)
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, context=app.state.context, enqueuer=enqueuer, keys=keys)


@pytest.fixture
def postgres_s3_api(postgres_url, s3_storage, tiny_folders, tmp_path):
    """The gateway on the session's PostgreSQL and SeaweedFS (S3), with two fresh tenants."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.settings import Settings
    from shared.tenants import create_tenant

    settings = Settings(database_url=postgres_url, data_dir=tmp_path, base_model="tiny-sd")
    enqueuer = RecordingEnqueuer()
    app = create_app(settings, enqueuer=enqueuer, storage=s3_storage)
    keys = {}
    with make_session_factory(make_engine(postgres_url))() as session:
        for name in ("acme", "globex"):
            _, keys[name] = create_tenant(session, f"{name}-{uuid.uuid4().hex[:6]}")
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, context=app.state.context, enqueuer=enqueuer, keys=keys)


@pytest.mark.parametrize("backend", ["sqlite_local_api", "postgres_s3_api"])
def test_deleting_a_tenant_leaves_no_row_and_no_blob_of_it(backend, request):
    api = request.getfixturevalue(backend)
    admin = _admin_headers(api)
    victim, bystander = _tenant_id(api, "acme"), _tenant_id(api, "globex")
    _populate(api, "acme", victim)
    _populate(api, "globex", bystander)
    engine = api.context.engine
    before, bystander_before = _rows_by_table(engine, victim), _rows_by_table(engine, bystander)
    # Every tenant table is covered (a new one must be added to _populate, and must cascade).
    assert set(before) >= {"tenants", "api_keys", "trainings", "generations", "batches", "adapters",
                           "idempotency_keys", "tenant_service", "usage_records"}  # fmt: skip
    assert all(count > 0 for count in before.values()), before
    assert len(_blobs(api, victim)) >= 4  # two training images, an adapter, an image

    response = api.client.delete(f"/v1/tenants/{victim}", headers=admin)
    assert response.status_code == 204, response.text
    assert _rows_by_table(engine, victim) == dict.fromkeys(before, 0)
    assert _blobs(api, victim) == []
    assert api.client.get("/v1/trainings", headers=api.headers("acme")).status_code == 401
    assert _rows_by_table(engine, bystander) == bystander_before
    assert len(_blobs(api, bystander)) >= 4
    assert api.client.get("/v1/trainings", headers=api.headers("globex")).status_code == 200
    again = api.client.delete(f"/v1/tenants/{victim}", headers=admin)
    assert again.status_code == 404 and again.json()["error"]["code"] == "tenant_not_found"


def test_a_storage_failure_after_the_rows_are_gone_is_logged_not_an_error(api, monkeypatch, caplog):
    from shared.storage import StorageError

    admin = _admin_headers(api)
    victim = _tenant_id(api)

    def unreachable(prefix):
        raise StorageError("connection refused")

    monkeypatch.setattr(api.context.storage, "delete_prefix", unreachable)
    with caplog.at_level(logging.WARNING, logger="krona.gateway"):
        assert api.client.delete(f"/v1/tenants/{victim}", headers=admin).status_code == 204
    assert any(victim in r.getMessage() and "sweep" in r.getMessage() for r in caplog.records)
    with api.context.sessions() as session:
        assert session.get(Tenant, victim) is None


# krona admin --------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An embedded data folder at the migration head (no KRONA_* from the environment)."""
    for name in ("KRONA_DATABASE_URL", "KRONA_S3_ENDPOINT", "KRONA_DATA_DIR", "KRONA_BLOB_DIR"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "krona-data"
    assert main(["migrate", "--data-dir", str(folder)]) == 0
    return folder


def _admin(capsys, data_dir, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["admin", *args, "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def _sessions(data_dir):
    return make_session_factory(make_engine(f"sqlite:///{(data_dir / 'krona.db').resolve()}"))


def test_admin_commands_manage_keys_and_limits(data_dir, capsys):
    assert _admin(capsys, data_dir, "create-tenant", "acme")[0] == 0
    code, out, _ = _admin(capsys, data_dir, "create-admin-key", "--name", "ops")
    admin_key = out.strip().splitlines()[-1]
    assert code == 0 and admin_key.startswith("krona_")
    code, out, _ = _admin(capsys, data_dir, "create-key", "acme", "--name", "ci")
    key = out.strip().splitlines()[-1]
    assert code == 0 and key.startswith("krona_") and "tenant acme" in out
    with _sessions(data_dir)() as session:
        admin_row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(admin_key)))
        assert admin_row.role == "admin" and admin_row.tenant_id is None and admin_row.name == "ops"
        tenant = session.scalar(select(Tenant).where(Tenant.name == "acme"))
        key_row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert key_row.tenant_id == tenant.id and key_row.name == "ci"

    for ref in ("acme", tenant.id):  # a name or an id
        code, out, _ = _admin(capsys, data_dir, "list-keys", ref)
        assert code == 0 and key_row.id in out and key[:12] in out and key not in out and "ci" in out
    code, out, _ = _admin(capsys, data_dir, "revoke-key", key_row.id)
    assert code == 0 and "revoked" in out
    code, out, _ = _admin(capsys, data_dir, "revoke-key", key_row.id)
    assert code == 0 and "already revoked" in out
    with _sessions(data_dir)() as session:
        assert session.get(ApiKey, key_row.id).revoked_at is not None
    code, _, err = _admin(capsys, data_dir, "revoke-key", "key_000000000000000000000000")
    assert code == 2 and "no API key" in err and len(err.strip().splitlines()) == 1

    code, out, _ = _admin(capsys, data_dir, "list-tenants")
    assert code == 0 and "acme" in out and tenant.id in out

    code, out, _ = _admin(capsys, data_dir, "set-limits", "acme", "--weight", "2.5", "--max-queued-jobs", "7",
                          "--rate-limit-per-second", "1.5")  # fmt: skip
    assert code == 0 and "weight 2.5" in out
    assert any(line.split()[:3] == ["max_queued_jobs", "7", "override"] for line in out.splitlines()), out
    code, out, _ = _admin(capsys, data_dir, "set-limits", tenant.id, "--clear", "max-queued-jobs", "weight")
    assert code == 0 and "weight 1" in out
    with _sessions(data_dir)() as session:
        row = session.get(Tenant, tenant.id)
        assert row.limits == {"rate_limit_per_second": 1.5} and row.weight == 1.0
    code, out, _ = _admin(capsys, data_dir, "list-tenants")
    assert "rate_limit_per_second=1.5" in out

    refusals = (
        (["--max-queued-jobs", "-1"], "--max-queued-jobs"),
        (["--weight", "0"], "--weight"),
        ([], "nothing to change"),
        (["--weight", "2", "--clear", "weight"], "set and cleared"),
    )
    for bad, message in refusals:
        code, _, err = _admin(capsys, data_dir, "set-limits", "acme", *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _admin(capsys, data_dir, "set-limits", "nobody", "--weight", "2")
    assert code == 2 and "no tenant 'nobody'" in err


def test_admin_usage_and_delete_tenant(data_dir, capsys):
    from datetime import date

    from shared.settings import Settings
    from shared.storage import storage_from_settings

    for name in ("acme", "globex"):
        assert _admin(capsys, data_dir, "create-tenant", name)[0] == 0
    with _sessions(data_dir)() as session:
        ids = dict(session.execute(select(Tenant.name, Tenant.id)).all())
        session.add(new_record(ids["acme"], "generation", "gen_1", "succeeded", Usage(2.0, "cpu", images=2, steps=4)))
        session.add(new_record(ids["acme"], "training", "trn_1", "succeeded", Usage(10.0, "cuda:0", steps=5)))
        session.add(new_record(ids["globex"], "generation", "gen_2", "failed", Usage(0.5, "cpu")))
        session.commit()

    code, out, _ = _admin(capsys, data_dir, "usage", "--json")
    totals = json.loads(out)
    assert code == 0 and totals["end"] == date.today().isoformat() and len(totals["data"]) == 3
    code, out, _ = _admin(capsys, data_dir, "usage", "--tenant", "acme", "--granularity", "total")
    assert code == 0 and "acme" in out and "globex" not in out and "cuda:0=10.0" in out
    assert any(line.split()[:4] == ["total", "acme", "generation", "1"] for line in out.splitlines()), out
    code, _, err = _admin(capsys, data_dir, "usage", "--start", "yesterday")
    assert code == 2 and "--start is not a date" in err
    code, _, err = _admin(capsys, data_dir, "usage", "--start", "2026-05-02", "--end", "2026-05-01")
    assert code == 2 and "end is before start" in err

    storage = storage_from_settings(Settings(data_dir=data_dir.resolve()))
    for tenant_id in ids.values():
        storage.put_bytes(f"tenants/{tenant_id}/adapters/adp_0.safetensors", b"x")
    code, _, err = _admin(capsys, data_dir, "delete-tenant", "acme")
    assert code == 2 and "--yes" in err
    code, out, _ = _admin(capsys, data_dir, "delete-tenant", "acme", "--yes")
    assert code == 0 and "deleted" in out and "1 files" in out
    with _sessions(data_dir)() as session:
        assert session.get(Tenant, ids["acme"]) is None
        for model in (ApiKey, UsageRecord):
            assert session.scalar(select(func.count()).select_from(model).where(model.tenant_id == ids["acme"])) == 0
        assert session.scalar(select(func.count()).select_from(UsageRecord)) == 1  # globex's
    assert list(storage.list(f"tenants/{ids['acme']}/")) == [] and list(storage.list(f"tenants/{ids['globex']}/"))
    code, _, err = _admin(capsys, data_dir, "delete-tenant", "acme", "--yes")
    assert code == 2 and "no tenant 'acme'" in err
