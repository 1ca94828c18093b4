"""Limits and metering (issue 11): the per-key token bucket (429 with Retry-After and RateLimit-*), shared by
gateway replicas and exact under 120 concurrent clients; the per-tenant cap on queued jobs; per-tenant
overrides of the compute cap; GET /v1/usage against the recorded figures."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.api import set_tenant_limits, tenant_of

# Run after the parallel tests, alone (120 concurrent clients on two replicas): `make test`'s second phase (Makefile).
pytestmark = pytest.mark.serial


def test_a_key_over_its_rate_gets_429_with_retry_after_and_ratelimit_headers(api):
    set_tenant_limits(api, rate_limit_per_second=0.5, rate_limit_burst=3)
    answers = [api.client.get("/v1/trainings", headers=api.headers()) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["RateLimit-Limit"] == "3" for a in answers)
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 2 and int(refused.headers["RateLimit-Reset"]) >= 4
    assert refused.json()["error"]["details"] == {"limit_per_second": 0.5, "burst": 3}
    # The other tenant's keys have their own buckets (the defaults).
    other = api.client.get("/v1/trainings", headers=api.headers("globex"))
    assert other.status_code == 200 and int(other.headers["RateLimit-Limit"]) == api.context.settings.rate_limit_burst


def test_the_bucket_is_exact_for_120_concurrent_clients_across_two_gateway_replicas(api, tmp_path):
    """Two apps on one database (two replicas), 120 clients at once on one key: exactly the burst gets through."""
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.storage import LocalStorage

    set_tenant_limits(api, rate_limit_per_second=0.001, rate_limit_burst=50)
    replica = create_app(api.context.settings, enqueuer=api.enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(120)
    with TestClient(replica) as second:
        clients = [api.client, second]

        def call(i: int) -> None:
            start.wait(timeout=60)
            status = clients[i % 2].get("/v1/adapters", headers=api.headers()).status_code
            with lock:
                statuses.append(status)

        with ThreadPoolExecutor(max_workers=120) as pool:
            list(pool.map(call, range(120)))
    assert sorted(set(statuses)) == [200, 429]
    assert statuses.count(200) == 50 and statuses.count(429) == 70


def test_the_queued_jobs_cap_refuses_what_does_not_fit_and_writes_nothing(api):
    from shared.db import Generation

    tenant_id = set_tenant_limits(api, max_queued_jobs=3)
    four = {"generations": [{"prompt": f"p{i}"} for i in range(4)]}
    refused = api.client.post("/v1/batches", headers=api.headers(), json=four)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["details"] == {"queued": 0, "limit": 3, "requested": 4}
    assert api.client.post(
        "/v1/batches", headers=api.headers(), json={"generations": four["generations"][:3]}
    ).is_success
    one_more = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x"})
    assert one_more.status_code == 429 and one_more.json()["error"]["details"]["queued"] == 3
    # Another tenant is not affected; a finished job frees a place.
    assert api.client.post("/v1/generations", headers=api.headers("globex"), json={"prompt": "x"}).status_code == 202
    with api.context.sessions() as session:
        job = session.query(Generation).filter_by(tenant_id=tenant_id, status="queued").first()
        job.status = "succeeded"
        session.commit()
    assert api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x"}).status_code == 202


def test_the_compute_cap_is_overridden_per_tenant(api):
    set_tenant_limits(api, max_generation_compute=64 * 64 * 10)
    small = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x", "steps": 10})
    assert small.status_code == 202
    big = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x", "steps": 11})
    assert big.status_code == 422 and big.json()["error"]["details"]["limit"] == 64 * 64 * 10
    assert api.client.post(
        "/v1/generations", headers=api.headers("globex"), json={"prompt": "x", "steps": 11}
    ).is_success


def test_jobs_carry_their_cost_and_new_tenants_their_counter(api):
    from shared.db import Generation, TenantService

    tenant_id = tenant_of(api).id
    job = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x", "steps": 10, "num_images": 2})
    with api.context.sessions() as session:
        assert session.get(Generation, job.json()["id"]).cost == 64 * 64 * 10 * 2 / 4096
        assert session.get(TenantService, (tenant_id, "infer")) is not None


def test_a_usage_range_defaults_to_the_30_days_up_to_its_end_and_names_a_bad_day():
    from datetime import date, timedelta

    from shared.db import utcnow
    from shared.errors import BadRequest
    from shared.usage import report_range

    today = utcnow().date()
    assert report_range(None, None) == (today - timedelta(days=29), today)
    assert report_range(None, "2026-03-31") == (date(2026, 3, 2), date(2026, 3, 31))
    assert report_range("2026-01-01", "2026-01-31") == (date(2026, 1, 1), date(2026, 1, 31))
    with pytest.raises(BadRequest, match="--end is not a date"):
        report_range(None, "2026-02-30", ("--start", "--end"))


def test_usage_reports_what_the_jobs_recorded_per_day_month_and_total(api):
    from datetime import UTC, datetime

    from shared.db import UsageRecord

    tenant_id, other_id = tenant_of(api).id, tenant_of(api, "globex").id
    records = [
        (tenant_id, "generation", "2026-11-02", 1.5, 4, 20, 4 * 64 * 64, "cpu"),
        (tenant_id, "generation", "2026-11-02", 0.5, 1, 25, 64 * 64, "cuda:H100"),
        (tenant_id, "generation", "2026-11-20", 2.0, 2, 20, 2 * 64 * 64, "cpu"),
        (tenant_id, "training", "2026-11-20", 30.0, 0, 100, 100 * 64 * 64, "cpu"),
        (tenant_id, "generation", "2026-10-31", 9.0, 9, 9, 9, "cpu"),  # before the range
        (other_id, "generation", "2026-11-02", 7.0, 7, 7, 7, "cpu"),  # another tenant's
    ]
    with api.context.sessions() as session:
        for i, (tenant, kind, day, seconds, images, steps, pixels, device) in enumerate(records):
            session.add(
                UsageRecord(
                    tenant_id=tenant, kind=kind, job_id=f"gen_{i:024d}", status="succeeded", device=device,
                    worker_seconds=seconds, images=images, steps=steps, pixels=pixels, day=day,
                    finished_at=datetime.fromisoformat(day).replace(tzinfo=UTC),
                )
            )  # fmt: skip
        session.commit()
    params = {"start": "2026-11-01", "end": "2026-11-30"}
    daily = api.client.get("/v1/usage", headers=api.headers(), params=params).json()
    assert daily["granularity"] == "day" and daily["start"] == "2026-11-01"
    assert [(d["period"], d["kind"], d["jobs"], d["images"]) for d in daily["data"]] == [
        ("2026-11-02", "generation", 2, 5),
        ("2026-11-20", "generation", 1, 2),
        ("2026-11-20", "training", 1, 0),
    ]
    assert daily["data"][0]["devices"] == {"cpu": 1.5, "cuda:H100": 0.5} and daily["data"][0]["worker_seconds"] == 2.0
    total = api.client.get("/v1/usage", headers=api.headers(), params=params | {"granularity": "total"}).json()
    assert [(d["kind"], d["jobs"], d["steps"], d["pixels"]) for d in total["data"]] == [
        ("generation", 3, 65, 7 * 64 * 64),
        ("training", 1, 100, 100 * 64 * 64),
    ]
    monthly = api.client.get("/v1/usage", headers=api.headers(), params=params | {"granularity": "month"}).json()
    assert {d["period"] for d in monthly["data"]} == {"2026-11"}
    bad = api.client.get("/v1/usage", headers=api.headers(), params={"start": "2026-12-01", "end": "2026-11-01"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_range"
    assert api.client.get("/v1/usage", headers=api.headers(), params={"start": "2026-13-01"}).status_code in (400, 422)


def test_the_queued_jobs_cap_is_exact_for_120_concurrent_creates(api):
    """The tenant's row is locked while a create commits (PostgreSQL): 120 at once, a cap of 50, 50 accepted."""
    from sqlalchemy import func, select

    from shared.db import Generation

    tenant_id = set_tenant_limits(api, max_queued_jobs=50)
    start = threading.Barrier(120)

    def create(i: int) -> int:
        start.wait(timeout=60)
        return api.client.post("/v1/generations", headers=api.headers(), json={"prompt": f"p{i}"}).status_code

    with ThreadPoolExecutor(max_workers=120) as pool:
        statuses = list(pool.map(create, range(120)))
    assert statuses.count(202) == 50 and statuses.count(429) == 70, sorted(set(statuses))
    with api.context.sessions() as session:
        queued = session.scalar(select(func.count()).select_from(Generation).where(Generation.tenant_id == tenant_id))
    assert queued == 50


def test_per_tenant_metric_labels_are_bounded():
    from prometheus_client import REGISTRY

    from shared.usage import Usage
    from workers import usage as metering

    labels = metering.TenantLabels(2)
    assert [labels(t) for t in ("ten_a", "ten_b", "ten_c", "ten_a", "ten_d")] == [
        "ten_a", "ten_b", "other", "ten_a", "other"
    ]  # fmt: skip
    before = REGISTRY.get_sample_value("krona_tenant_images_total", {"tenant": "other"}) or 0.0
    metering._labels = metering.TenantLabels(0)  # this process names no tenant: everything is "other"
    try:
        metering.count_usage(
            tenant_id="ten_x", kind="generation", status="succeeded", usage=Usage(1.0, "cpu", images=3), max_tenants=0
        )
    finally:
        metering._labels = None
    assert REGISTRY.get_sample_value("krona_tenant_images_total", {"tenant": "other"}) == before + 3
