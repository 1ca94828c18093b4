"""Retention (issue 11): subject photos purged when a training ends, generated images expired after the TTL,
DELETE of ended trainings and generations, the storage sweep of orphaned blobs, `krona admin sweep`."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

from helpers.api import image_files, png
from sqlalchemy import update

from shared.db import Adapter, Batch, Evaluation, Generation, Training, utcnow
from shared.tenants import tenant_for_key
from workers.retention import expire_generation_images, purge_training_inputs, run_retention, sweep_storage
from workers.runtime import Runtime


def _runtime(api, **settings) -> Runtime:
    """A worker runtime on the API fixture's database and storage, with these settings changed."""
    return Runtime(
        settings=api.context.settings.model_copy(update=settings),
        sessions=api.context.sessions,
        storage=api.context.storage,
        owner="test",
    )


def _tenant_id(api, tenant: str = "acme") -> str:
    with api.context.sessions() as session:
        return tenant_for_key(session, api.keys[tenant]).id


def _keys(api, prefix: str) -> list[str]:
    return sorted(api.context.storage.list(prefix))


def _finished_training(api, status: str = "succeeded", tenant: str = "acme") -> Training:
    """A training created through the API (its photos stored), then marked ended with a checkpoint in storage."""
    response = api.client.post(
        "/v1/trainings",
        headers=api.headers(tenant),
        data={"instance_prompt": "a photo of sks dog", "params": '{"steps": 5}'},
        files=image_files(2),
    )
    assert response.status_code == 202, response.text
    training_id = response.json()["id"]
    with api.context.sessions() as session:
        row = session.get(Training, training_id)
        checkpoint = f"tenants/{row.tenant_id}/trainings/{training_id}/checkpoint.tar"
        api.context.storage.put_bytes(checkpoint, b"checkpoint")
        if status != "queued":
            row.status, row.finished_at, row.checkpoint_key = status, utcnow(), checkpoint
        session.commit()
        session.expunge(row)
    return row


def _generation(api, status: str = "succeeded", finished_ago: timedelta = timedelta(0), tenant: str = "acme",
                batch_id: str | None = None) -> Generation:  # fmt: skip
    """A generation row of the tenant with two images stored where the inference worker writes them."""
    tenant_id = _tenant_id(api, tenant)
    with api.context.sessions() as session:
        finished_at = None if status == "running" else utcnow() - finished_ago
        row = Generation(tenant_id=tenant_id, prompt="p", width=64, height=64, seed=5, num_images=2, status=status,
                         batch_id=batch_id, finished_at=finished_at)  # fmt: skip
        session.add(row)
        session.flush()
        if status == "succeeded":
            row.images = [
                {"index": i, "key": f"tenants/{tenant_id}/generations/{row.id}/{i}.png", "seed": 5 + i} for i in (0, 1)
            ]
            for i, image in enumerate(row.images):
                api.context.storage.put_bytes(image["key"], png(i))
        session.commit()
        session.expunge(row)
    return row


# Training inputs ------------------------------------------------------------------------------------------


def test_ended_training_leaves_no_subject_photo_in_storage(api):
    rt = _runtime(api)
    for status in ("succeeded", "failed", "canceled"):
        row = _finished_training(api, status)
        folder = f"tenants/{row.tenant_id}/trainings/{row.id}/"
        assert len(_keys(api, folder)) == 3  # two photos and the checkpoint
        assert purge_training_inputs(rt, row.id) is True
        assert _keys(api, folder) == [], status
        assert purge_training_inputs(rt, row.id) is False  # idempotent
        body = api.client.get(f"/v1/trainings/{row.id}", headers=api.headers()).json()
        assert body["images_deleted_at"] is not None and body["num_images"] == 2
        with api.context.sessions() as session:
            assert session.get(Training, row.id).checkpoint_key is None


def test_active_training_keeps_its_photos(api):
    row = _finished_training(api, "queued")
    assert purge_training_inputs(_runtime(api), row.id) is False
    assert len(_keys(api, f"tenants/{row.tenant_id}/trainings/{row.id}/images/")) == 2
    assert api.client.get(f"/v1/trainings/{row.id}", headers=api.headers()).json()["images_deleted_at"] is None


def test_keep_training_images_keeps_the_photos_but_not_the_checkpoint(api):
    rt = _runtime(api, keep_training_images=True)
    row = _finished_training(api)
    folder = f"tenants/{row.tenant_id}/trainings/{row.id}/"
    assert purge_training_inputs(rt, row.id) is True  # the checkpoint: a finished training is never resumed
    assert _keys(api, folder) == sorted(row.image_keys)
    assert purge_training_inputs(rt, row.id) is False
    sweep = sweep_storage(rt, now=utcnow() + timedelta(hours=2))  # every blob is past the grace
    assert _keys(api, folder) == sorted(row.image_keys) and sweep["deleted_training"] == 0
    assert api.client.get(f"/v1/trainings/{row.id}", headers=api.headers()).json()["images_deleted_at"] is None


def test_retention_pass_purges_trainings_a_crashed_worker_did_not(api):
    row = _finished_training(api, "failed")
    counts = run_retention(_runtime(api))
    assert counts["errors"] == 0 and counts["trainings_purged"] >= 1
    assert _keys(api, f"tenants/{row.tenant_id}/trainings/{row.id}/") == []


# Generated images -----------------------------------------------------------------------------------------


def test_images_expire_after_the_ttl_and_answer_410(api):
    old = _generation(api, finished_ago=timedelta(hours=25))
    young = _generation(api, finished_ago=timedelta(hours=23))
    assert expire_generation_images(_runtime(api, generation_ttl_hours=0)) == 0  # 0 = kept forever
    assert expire_generation_images(_runtime(api, generation_ttl_hours=24)) >= 1
    assert _keys(api, f"tenants/{old.tenant_id}/generations/{old.id}/") == []
    assert len(_keys(api, f"tenants/{young.tenant_id}/generations/{young.id}/")) == 2
    gone = api.client.get(f"/v1/generations/{old.id}/images/0", headers=api.headers())
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "image_expired"
    assert api.client.get(f"/v1/generations/{old.id}/images/7", headers=api.headers()).status_code == 404
    body = api.client.get(f"/v1/generations/{old.id}", headers=api.headers()).json()
    assert body["images_expired_at"] is not None and [i["seed"] for i in body["images"]] == [5, 6]
    kept = api.client.get(f"/v1/generations/{young.id}/images/1", headers=api.headers())
    assert kept.status_code == 200 and kept.content == png(1)
    assert api.client.get(f"/v1/generations/{young.id}", headers=api.headers()).json()["images_expired_at"] is None
    assert expire_generation_images(_runtime(api, generation_ttl_hours=24)) == 0  # idempotent


# DELETE routes --------------------------------------------------------------------------------------------


def test_delete_training(api):
    row = _finished_training(api)
    folder = f"tenants/{row.tenant_id}/trainings/{row.id}/"
    adapter_key = f"tenants/{row.tenant_id}/adapters/adp_0123456789abcdef01234567.safetensors"
    api.context.storage.put_bytes(adapter_key, b"adapter")
    with api.context.sessions() as session:
        session.add(Adapter(id="adp_0123456789abcdef01234567", tenant_id=row.tenant_id, base_model="tiny-sd",
                            config={"a1": 64, "a2": 8}, num_parameters=1, size_bytes=7, sha256="0" * 64,
                            storage_key=adapter_key, training_id=row.id))  # fmt: skip
        session.commit()
    assert api.client.delete(f"/v1/trainings/{row.id}", headers=api.headers("globex")).status_code == 404
    assert len(_keys(api, folder)) == 3  # another tenant's request touched nothing
    assert api.client.delete(f"/v1/trainings/{row.id}", headers=api.headers()).status_code == 204
    assert _keys(api, folder) == []
    assert api.client.get(f"/v1/trainings/{row.id}", headers=api.headers()).status_code == 404
    assert api.client.delete(f"/v1/trainings/{row.id}", headers=api.headers()).status_code == 404
    adapter = api.client.get("/v1/adapters/adp_0123456789abcdef01234567", headers=api.headers())
    assert adapter.status_code == 200 and api.context.storage.exists(adapter_key)  # the adapter stays

    active = _finished_training(api, "queued")
    refused = api.client.delete(f"/v1/trainings/{active.id}", headers=api.headers())
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "training_active"
    assert "cancel it first" in refused.json()["error"]["message"]
    assert len(_keys(api, f"tenants/{active.tenant_id}/trainings/{active.id}/images/")) == 2
    assert api.client.post(f"/v1/trainings/{active.id}/cancel", headers=api.headers()).status_code == 202
    assert api.client.delete(f"/v1/trainings/{active.id}", headers=api.headers()).status_code == 204


def test_delete_generation_and_its_batch(api):
    with api.context.sessions() as session:
        batch = Batch(tenant_id=_tenant_id(api), total=2)
        session.add(batch)
        session.commit()
        batch_id = batch.id
    done = _generation(api, batch_id=batch_id)
    running = _generation(api, "running", batch_id=batch_id)
    assert api.client.delete(f"/v1/generations/{done.id}", headers=api.headers("globex")).status_code == 404
    refused = api.client.delete(f"/v1/generations/{running.id}", headers=api.headers())
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "generation_active"
    assert api.client.delete(f"/v1/generations/{done.id}", headers=api.headers()).status_code == 204
    assert _keys(api, f"tenants/{done.tenant_id}/generations/{done.id}/") == []
    assert api.client.get(f"/v1/generations/{done.id}", headers=api.headers()).status_code == 404
    assert api.client.get(f"/v1/generations/{done.id}/images/0", headers=api.headers()).status_code == 404
    batch_body = api.client.get(f"/v1/batches/{batch_id}", headers=api.headers())
    assert batch_body.status_code == 200
    assert batch_body.json()["generation_ids"] == [running.id] and batch_body.json()["total"] == 2
    assert batch_body.json()["counts"]["succeeded"] == 0 and batch_body.json()["counts"]["running"] == 1
    failed = _generation(api, "failed")
    assert api.client.delete(f"/v1/generations/{failed.id}", headers=api.headers()).status_code == 204


def test_openapi_documents_the_deletes_and_410(api):
    spec = api.client.get("/openapi.json").json()
    training = spec["paths"]["/v1/trainings/{training_id}"]["delete"]
    assert {"204", "404", "409"} <= set(training["responses"]) and "adapter" in training["description"]
    generation = spec["paths"]["/v1/generations/{generation_id}"]["delete"]
    assert {"204", "404", "409"} <= set(generation["responses"])
    assert "410" in spec["paths"]["/v1/generations/{generation_id}/images/{index}"]["get"]["responses"]
    schemas = spec["components"]["schemas"]
    assert "images_deleted_at" in schemas["TrainingPublic"]["properties"]
    assert "images_expired_at" in schemas["GenerationPublic"]["properties"]


# The storage sweep ----------------------------------------------------------------------------------------


def _age(api, key: str, seconds: float) -> None:
    """Make a local blob look ``seconds`` old."""
    path = api.context.storage._path(key)
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_deletes_old_orphans_and_leaves_young_and_referenced_blobs(api):
    rt = _runtime(api, sweep_grace_seconds=3600)
    tenant_id = _tenant_id(api)
    kept_generation = _generation(api)
    live_training = _finished_training(api, "queued")
    with api.context.sessions() as session:
        adapter_key = f"tenants/{tenant_id}/adapters/adp_aaaaaaaaaaaaaaaaaaaaaaaa.safetensors"
        evaluation_id = "evl_111111111111111111111111"
        evaluation_key = f"tenants/{tenant_id}/adapters/adp_aaaaaaaaaaaaaaaaaaaaaaaa/evaluation/{evaluation_id}/00.png"
        session.add(Adapter(id="adp_aaaaaaaaaaaaaaaaaaaaaaaa", tenant_id=tenant_id, base_model="tiny-sd",
                            config={"a1": 64, "a2": 8}, num_parameters=1, size_bytes=1, sha256="0" * 64,
                            storage_key=adapter_key))  # fmt: skip
        session.flush()
        session.add(Evaluation(id=evaluation_id, tenant_id=tenant_id, adapter_id="adp_aaaaaaaaaaaaaaaaaaaaaaaa",
                               base_model="tiny-sd", params={}, reference_keys=[evaluation_key]))  # fmt: skip
        session.add(Evaluation(id="evl_000000000000000000000000", tenant_id=tenant_id, status="succeeded",
                               adapter_id="adp_aaaaaaaaaaaaaaaaaaaaaaaa", base_model="tiny-sd", params={},
                               reference_keys=[]))  # fmt: skip
        session.commit()
    orphans = [
        "tenants/ten_000000000000000000000000/adapters/adp_bbbbbbbbbbbbbbbbbbbbbbbb.safetensors",  # tenant gone
        f"tenants/{tenant_id}/trainings/trn_000000000000000000000000/images/00.png",  # training gone
        f"tenants/{tenant_id}/generations/gen_000000000000000000000000/0.png",  # generation gone
        f"tenants/{tenant_id}/generations/{kept_generation.id}/9.png",  # its row does not name it
        f"tenants/{tenant_id}/adapters/adp_cccccccccccccccccccccccc.safetensors",  # adapter gone
        "tmp/0123456789abcdef0123456789abcdef/tenants/x/adapters/a.safetensors",  # an abandoned upload
        # an ended evaluation's, and one whose row (its adapter) is gone
        f"tenants/{tenant_id}/adapters/adp_aaaaaaaaaaaaaaaaaaaaaaaa/evaluation/evl_000000000000000000000000/00.png",
        f"tenants/{tenant_id}/adapters/adp_cccccccccccccccccccccccc/evaluation/evl_222222222222222222222222/00.png",
    ]
    young = [f"tenants/{tenant_id}/trainings/trn_111111111111111111111111/images/00.png", "tmp/ffff/x.bin"]
    unknown = f"tenants/{tenant_id}/notes.txt"
    referenced = [adapter_key, evaluation_key, *(i["key"] for i in kept_generation.images), *live_training.image_keys]
    for key in [*orphans, *young, unknown, adapter_key, evaluation_key]:
        api.context.storage.put_bytes(key, b"x")
    for key in [*orphans, unknown, *referenced]:
        _age(api, key, 7200)
    counts = sweep_storage(rt)
    for key in orphans:
        assert not api.context.storage.exists(key), key
    for key in [*young, unknown, *referenced]:
        assert api.context.storage.exists(key), key
    assert counts["deleted_tenant"] == 1 and counts["deleted_training"] == 1 and counts["deleted_generation"] == 2
    assert counts["deleted_adapter"] == 1 and counts["deleted_tmp"] == 1 and counts["unknown"] == 1
    assert counts["deleted_evaluation"] == 2
    assert counts["young"] >= 2 and counts["kept"] >= len(referenced)
    assert sweep_storage(rt, now=utcnow() + timedelta(hours=2))["deleted_tmp"] == 1  # the young one, aged


def test_sweep_removes_the_photos_of_purged_trainings_and_expired_images(api):
    rt = _runtime(api)
    training = _finished_training(api)
    generation = _generation(api, finished_ago=timedelta(days=60))
    with api.context.sessions() as session:  # marked, but their blobs are still there (a late write, a crash)
        session.execute(update(Training).where(Training.id == training.id).values(images_deleted_at=utcnow()))
        session.execute(update(Generation).where(Generation.id == generation.id).values(images_expired_at=utcnow()))
        session.commit()
    counts = sweep_storage(rt, now=utcnow() + timedelta(hours=2))
    assert _keys(api, f"tenants/{training.tenant_id}/trainings/{training.id}/") == []
    assert _keys(api, f"tenants/{generation.tenant_id}/generations/{generation.id}/") == []
    assert counts["deleted_training"] == 3 and counts["deleted_generation"] == 2


def test_reaper_runs_retention_at_most_every_interval(api, monkeypatch):
    from workers import reaper

    rt = _runtime(api, retention_interval_seconds=3600)
    key = "tmp/aaaa/old.bin"
    api.context.storage.put_bytes(key, b"x")
    _age(api, key, 7200)
    monkeypatch.setattr(reaper, "_last_retention", None)
    thread = reaper.start_retention_if_due(rt)
    assert thread is not None
    thread.join(60)
    assert not api.context.storage.exists(key)
    assert reaper.start_retention_if_due(rt) is None  # not due again for an hour

    def fail(rt):
        raise RuntimeError("storage exploded")

    monkeypatch.setattr(reaper, "run_retention", fail)
    monkeypatch.setattr(reaper, "_last_retention", None)
    thread = reaper.start_retention_if_due(rt)
    thread.join(60)  # logged, not raised; the lock is free for the next interval
    assert reaper._retention_running.acquire(blocking=False)
    reaper._retention_running.release()


def test_s3_listing_with_times_and_sweep(s3_storage, api):
    before = utcnow() - timedelta(minutes=5)
    s3_storage.put_bytes("tmp/abc/x.bin", b"x")
    s3_storage.put_bytes("tenants/ten_000000000000000000000000/generations/gen_1/0.png", b"y")
    listed = dict(s3_storage.list_with_times("t"))
    assert set(listed) == {"tmp/abc/x.bin", "tenants/ten_000000000000000000000000/generations/gen_1/0.png"}
    for modified in listed.values():
        assert modified.tzinfo is not None and before < modified < utcnow() + timedelta(minutes=5)
    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=s3_storage, owner="test")
    assert sweep_storage(rt)["young"] == 2  # inside the grace: left
    counts = sweep_storage(rt, now=utcnow() + timedelta(hours=2))
    assert counts["deleted_tmp"] == 1 and counts["deleted_tenant"] == 1
    assert list(s3_storage.list("")) == []


def test_local_listing_with_times(tmp_path):
    from shared.storage import LocalStorage

    storage = LocalStorage(tmp_path / "blobs")
    storage.put_bytes("a/b.bin", b"x")
    temporary = storage.temporary_key("a/c.bin")
    storage.put_bytes(temporary, b"y")
    then = time.time() - 7200
    os.utime(storage._path(temporary), (then, then))
    storage.commit(temporary, "a/c.bin")
    listed = dict(storage.list_with_times("a/"))
    assert set(listed) == {"a/b.bin", "a/c.bin"}
    assert listed["a/c.bin"] > utcnow() - timedelta(minutes=5)  # a commit counts as a new write


# The CLI --------------------------------------------------------------------------------------------------


def test_krona_admin_sweep(api, postgres_url, tmp_path, monkeypatch, capsys):
    from services.cli.main import main

    monkeypatch.setenv("KRONA_DATABASE_URL", postgres_url)
    monkeypatch.setenv("KRONA_DATA_DIR", str(tmp_path / "cli"))
    assert main(["admin", "sweep", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["errors"] == 0 and {"trainings_purged", "generations_expired", "deleted_tmp"} <= set(counts)
    assert main(["admin", "sweep"]) == 0
    assert "generations_expired" in capsys.readouterr().out


def test_retention_on_the_embedded_sqlite_database(tmp_path):
    """SQLite hands back naive timestamps: the same pass works on the embedded database."""
    from shared.db import upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant
    from workers.runtime import build_runtime

    settings = Settings(data_dir=tmp_path, base_model="tiny-sd")
    upgrade_to_head(settings.resolved_database_url)
    rt = build_runtime(settings, storage=LocalStorage(tmp_path / "blobs"))
    with rt.sessions() as session:
        tenant, _ = create_tenant(session, "solo")
        training = Training(tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="p", status="canceled",
                            finished_at=utcnow())  # fmt: skip
        generation = Generation(tenant_id=tenant.id, prompt="p", width=64, height=64, seed=1, status="succeeded",
                                finished_at=utcnow() - timedelta(days=31))  # fmt: skip
        session.add_all([training, generation])
        session.flush()
        photo = f"tenants/{tenant.id}/trainings/{training.id}/images/00.png"
        image = f"tenants/{tenant.id}/generations/{generation.id}/0.png"
        training.image_keys, generation.images = [photo], [{"index": 0, "key": image, "seed": 1}]
        session.commit()
    for key in (photo, image, "tmp/old/x.bin", f"tenants/{tenant.id}/adapters/adp_gone.safetensors"):
        rt.storage.put_bytes(key, b"x")
    counts = run_retention(rt, now=utcnow() + timedelta(hours=2))
    assert counts["errors"] == 0 and counts["trainings_purged"] == 1 and counts["generations_expired"] == 1
    assert counts["deleted_tmp"] == 1 and counts["deleted_adapter"] == 1
    assert list(rt.storage.list("")) == []
    with rt.sessions() as session:
        assert session.get(Training, training.id).images_deleted_at is not None
        assert session.get(Generation, generation.id).images_expired_at is not None


def test_cached_class_images_stay_until_their_ttl(api):
    """Prior preservation's class images are a cache (workers/training/class_images.py): kept while the tenant
    exists, deleted once older than KRONA_CLASS_IMAGE_TTL_HOURS."""
    rt = _runtime(api, sweep_grace_seconds=60, class_image_ttl_hours=24)
    tenant_id = _tenant_id(api)
    fresh = f"tenants/{tenant_id}/class-images/{'a' * 32}/00000.png"
    stale = f"tenants/{tenant_id}/class-images/{'b' * 32}/00000.png"
    for key in (fresh, stale):
        api.context.storage.put_bytes(key, b"png")
    _age(api, fresh, 3600)
    _age(api, stale, 25 * 3600)
    counts = sweep_storage(rt)
    assert api.context.storage.exists(fresh) and not api.context.storage.exists(stale)
    assert counts["deleted_class_images"] == 1 and counts["unknown"] == 0
