"""Retention: what the service deletes from storage, and when.

- a training's subject photos, once it has ended (succeeded, failed or canceled), unless
  KRONA_KEEP_TRAINING_IMAGES; its checkpoint either way (a finished training is never resumed);
- generated images, KRONA_GENERATION_TTL_HOURS after their generation finished (0 = kept);
- the storage sweep: blobs that no row names any more (deleted tenants, trainings, generations and
  adapters; uploads abandoned under ``tmp/``), once older than KRONA_SWEEP_GRACE_SECONDS, so that an
  upload whose row is about to commit is never taken for an orphan.

The rows are the truth: a blob goes only when its row is gone or says it is no longer kept. Every step is
idempotent (deletes of absent keys are no errors, marks are guarded updates), so several workers may run it
at once. The reaper runs ``run_retention`` every KRONA_RETENTION_INTERVAL_SECONDS; ``krona admin sweep``
runs it by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from shared.db import TERMINAL_STATUSES, Adapter, Evaluation, Generation, JobStatus, Tenant, Training, utcnow
from shared.storage import keys as blob_keys

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("krona.worker.retention")

__all__ = [
    "expire_generation_images",
    "purge_finished_trainings",
    "purge_training_inputs",
    "run_retention",
    "sweep_storage",
]

# Rows handled in one transaction, and at most this many per pass: a pass stays short, the next one goes on.
BATCH_ROWS = 500
MAX_ROWS_PER_PASS = 5000
# Old blobs the sweep looks up in the database at once.
SWEEP_CHUNK = 1000


def purge_training_inputs(rt: Runtime, training_id: str) -> bool:
    """Delete an ended training's subject photos (unless KRONA_KEEP_TRAINING_IMAGES) and its checkpoint.

    Sets ``images_deleted_at`` and clears ``checkpoint_key``. True when this call removed something; False
    when there was nothing to do (no such row, still queued or running, already purged). Storage errors
    propagate and leave the row unmarked, so that the next retention pass tries again.
    """
    keep_images = rt.settings.keep_training_images
    with rt.sessions() as session:
        row = session.get(Training, training_id)
        if row is None or row.status not in TERMINAL_STATUSES:
            return False
        purge_images = not keep_images and row.images_deleted_at is None
        if not purge_images and row.checkpoint_key is None:
            return False
        keys = list(row.image_keys) if purge_images else []
        if row.checkpoint_key:
            keys.append(row.checkpoint_key)
        prefix = blob_keys.training_folder(row.tenant_id, row.id)
    for key in keys:
        rt.storage.delete(key)
    if purge_images:
        # Also whatever the training left under its folder without recording it (a checkpoint written as it ended).
        rt.storage.delete_prefix(prefix)
    else:
        rt.storage.delete_prefix(prefix + "checkpoint")
    values: dict = {"checkpoint_key": None}
    if purge_images:
        values["images_deleted_at"] = utcnow()
    with rt.sessions() as session:
        session.execute(update(Training).where(Training.id == training_id).values(**values))
        session.commit()
    log.info("training %s: %s removed from storage", training_id, "inputs" if purge_images else "checkpoint")
    return True


def purge_finished_trainings(rt: Runtime) -> int:
    """``purge_training_inputs`` for ended trainings still holding what it removes (the training job purges as it
    ends; this catches a worker that stopped in between, and trainings that ended before retention existed)."""
    pending = Training.checkpoint_key.is_not(None)
    if not rt.settings.keep_training_images:
        pending = or_(pending, Training.images_deleted_at.is_(None))
    purged = 0
    for _ in range(MAX_ROWS_PER_PASS // BATCH_ROWS):
        with rt.sessions() as session:
            ids = session.scalars(
                select(Training.id)
                .where(Training.status.in_(TERMINAL_STATUSES), pending)
                .order_by(Training.finished_at)
                .limit(BATCH_ROWS)
            ).all()
        for training_id in ids:
            purged += purge_training_inputs(rt, training_id)
        if len(ids) < BATCH_ROWS:
            break
    return purged


def expire_generation_images(rt: Runtime, now: datetime | None = None) -> int:
    """Delete the images of generations that finished more than KRONA_GENERATION_TTL_HOURS ago and set their
    ``images_expired_at`` (their image URLs answer 410 from then on). At most MAX_ROWS_PER_PASS generations a
    call, BATCH_ROWS per transaction; 0 when the TTL is 0 (images are kept). Returns how many expired."""
    ttl_hours = rt.settings.generation_ttl_hours
    if ttl_hours <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(hours=ttl_hours)
    expired = 0
    for _ in range(MAX_ROWS_PER_PASS // BATCH_ROWS):
        with rt.sessions() as session:
            # Only succeeded generations have images in their row; a failed one's strays are the sweep's.
            rows = session.execute(
                select(Generation.id, Generation.images)
                .where(
                    Generation.status == JobStatus.SUCCEEDED,
                    Generation.finished_at < cutoff,
                    Generation.images_expired_at.is_(None),
                )
                .order_by(Generation.finished_at)
                .limit(BATCH_ROWS)
            ).all()
        done: list[str] = []
        try:
            for generation_id, images in rows:
                for image in images or []:
                    rt.storage.delete(image["key"])
                done.append(generation_id)
        finally:  # those whose images are gone are marked even when storage failed on a later one
            if done:
                with rt.sessions() as session:
                    session.execute(
                        update(Generation)
                        .where(Generation.id.in_(done), Generation.images_expired_at.is_(None))
                        .values(images_expired_at=utcnow())
                    )
                    session.commit()
        expired += len(done)
        if len(rows) < BATCH_ROWS:
            break
    return expired


def _layout(key: str) -> tuple[str, str, str | None]:
    """(kind, tenant id, row id) of a key under ``tenants/``: shared/storage/keys.py's parser, which every writer's
    builder matches (tests/test_storage_keys.py)."""
    parsed = blob_keys.parse(key)
    return parsed.kind, parsed.tenant_id, parsed.row_id


def _chunks(items: Iterable[tuple[str, datetime]], size: int) -> Iterable[list[tuple[str, datetime]]]:
    chunk: list[tuple[str, datetime]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def sweep_storage(rt: Runtime, now: datetime | None = None) -> dict[str, int]:
    """Delete blobs under ``tenants/`` and ``tmp/`` that no row keeps, if older than KRONA_SWEEP_GRACE_SECONDS.

    Under ``tenants/{t}/``: everything when tenant ``t`` is gone; a training's files when its row is gone, or
    its photos were purged, or it ended and its photos are not kept (with KRONA_KEEP_TRAINING_IMAGES: what is
    not one of its photos); a generation's files when its row is gone, its images expired, or it ended and
    does not name them; an adapter's file when its row is gone. Files in a layout it does not know, and the
    files of queued or running jobs, are left. Everything old under ``tmp/`` goes (two-phase writes whose
    commit never came). Returns counts: scanned, young (left for their age), unknown (left for their
    layout), kept (a row names them), and deleted_tmp, deleted_tenant, deleted_training, deleted_generation,
    deleted_adapter, deleted_evaluation (reference images of an evaluation that ended or whose adapter is gone),
    deleted_class_images (cached class images older than KRONA_CLASS_IMAGE_TTL_HOURS).
    """
    cutoff = (now or utcnow()) - timedelta(seconds=rt.settings.sweep_grace_seconds)
    counts = dict.fromkeys(
        (
            "scanned",
            "young",
            "unknown",
            "deleted_tmp",
            "deleted_tenant",
            "deleted_training",
            "deleted_generation",
            "deleted_adapter",
            "deleted_evaluation",
            "deleted_class_images",
        ),
        0,
    )
    for prefix in ("tmp/", "tenants/"):
        for chunk in _chunks(rt.storage.list_with_times(prefix), SWEEP_CHUNK):
            counts["scanned"] += len(chunk)
            old = [key for key, modified in chunk if modified < cutoff]
            counts["young"] += len(chunk) - len(old)
            if prefix == "tmp/":
                for key in old:
                    rt.storage.delete(key)
                counts["deleted_tmp"] += len(old)
                continue
            class_cutoff = (now or utcnow()) - timedelta(hours=rt.settings.class_image_ttl_hours)
            stale_class_images = [
                key for key, modified in chunk if modified < class_cutoff and _layout(key)[0] == "class_images"
            ]
            for key in stale_class_images:
                rt.storage.delete(key)
            counts["deleted_class_images"] += len(stale_class_images)
            stale = set(stale_class_images)
            old = [key for key in old if key not in stale]
            for key, verdict in _verdicts(rt, old):
                if verdict != "unknown":
                    rt.storage.delete(key)
                counts[verdict] += 1
    deleted = sum(v for k, v in counts.items() if k.startswith("deleted_"))
    counts["kept"] = counts["scanned"] - counts["young"] - counts["unknown"] - deleted
    if deleted:
        log.info("storage sweep: %s", counts)
    return counts


def _verdicts(rt: Runtime, keys: list[str]) -> list[tuple[str, str]]:
    """(key, counter) for each of these keys under ``tenants/`` that no row keeps: ``deleted_*`` to delete it,
    ``unknown`` to leave it (a layout the sweep does not know, of a tenant that exists)."""
    layouts = {key: _layout(key) for key in keys}
    wanted: dict[str, set[str]] = {
        "tenant": set(),
        "training": set(),
        "generation": set(),
        "adapter": set(),
        "evaluation": set(),
    }
    for kind, tenant_id, row_id in layouts.values():
        wanted["tenant"].add(tenant_id)
        if row_id is not None:
            wanted[kind].add(row_id)
    training_columns = (
        Training.id,
        Training.tenant_id,
        Training.status,
        Training.images_deleted_at,
        Training.image_keys,
    )
    generation_columns = (
        Generation.id,
        Generation.tenant_id,
        Generation.status,
        Generation.images_expired_at,
        Generation.images,
    )
    adapter_columns = (Adapter.id, Adapter.tenant_id, Adapter.storage_key)
    evaluation_columns = (Evaluation.id, Evaluation.tenant_id, Evaluation.status, Evaluation.reference_keys)
    with rt.sessions() as session:
        tenants = set(session.scalars(select(Tenant.id).where(Tenant.id.in_(sorted(wanted["tenant"])))))
        rows = {
            kind: {row.id: row for row in session.execute(select(*columns).where(columns[0].in_(sorted(wanted[kind]))))}
            for kind, columns in (
                ("training", training_columns),
                ("generation", generation_columns),
                ("adapter", adapter_columns),
                ("evaluation", evaluation_columns),
            )
        }
    keep_images = rt.settings.keep_training_images
    verdicts = []
    for key, (kind, tenant_id, row_id) in layouts.items():
        if tenant_id not in tenants:
            verdicts.append((key, "deleted_tenant"))
        elif kind == "other":
            verdicts.append((key, "unknown"))
        elif kind == "class_images":
            continue  # a cache: kept while its tenant exists, until KRONA_CLASS_IMAGE_TTL_HOURS (sweep_storage)
        else:
            row = rows[kind].get(row_id)
            if row is None or row.tenant_id != tenant_id or not _kept(kind, row, key, keep_images):
                verdicts.append((key, f"deleted_{kind}"))
    return verdicts


def _kept(kind: str, row, key: str, keep_images: bool) -> bool:
    """Whether ``row`` (of a training, generation or adapter) still keeps the blob at ``key``."""
    if kind == "adapter":
        return row.storage_key == key
    if kind == "evaluation":  # an evaluation's reference images, until it ends
        return row.status not in TERMINAL_STATUSES and key in (row.reference_keys or [])
    if kind == "training":
        if row.images_deleted_at is not None:
            return False
        # An ended training keeps its photos only with KRONA_KEEP_TRAINING_IMAGES, and nothing else.
        return row.status not in TERMINAL_STATUSES or (keep_images and key in row.image_keys)
    if row.images_expired_at is not None:
        return False
    # An ended generation keeps the images its row names; a running one may be writing more.
    return row.status not in TERMINAL_STATUSES or key in {image["key"] for image in row.images or []}


def run_retention(rt: Runtime, now: datetime | None = None) -> dict[str, int]:
    """One retention pass: purge ended trainings' inputs, expire old generations' images, sweep storage.

    Each step runs even when another failed (a failure is logged and counted in ``errors``). Returns the
    counts: trainings_purged, generations_expired, errors, and those of ``sweep_storage``.
    """
    counts: dict[str, int] = {"trainings_purged": 0, "generations_expired": 0, "errors": 0}
    steps = (
        ("trainings_purged", lambda: purge_finished_trainings(rt)),
        ("generations_expired", lambda: expire_generation_images(rt, now)),
        ("sweep", lambda: sweep_storage(rt, now)),
    )
    for name, step in steps:
        try:
            result = step()
        except Exception:
            log.exception("retention: %s failed", name)
            counts["errors"] += 1
            continue
        if isinstance(result, dict):
            counts.update(result)
        else:
            counts[name] = result
    return counts
