"""Generation jobs on the resident engine, gathered into mixed-adapter batches.

A task's message wakes the worker; it claims the job the fair scheduler picks (the oldest queued request
of the tenant served least so far, shared/scheduler.py), waits ``KRONA_BATCH_WAIT_MS`` for company,
claims more queued generations with the same size, steps and guidance (each again the fairest pick, so
that batches mix tenants), and runs them as one batch on the worker's engine (each sample with its own
adapter and scale). Every queued job has a message, so the messages left over later claim what remains,
or find nothing and stop. Each finished request records its usage (its share of the batch's time, images,
steps, pixels) with its final status. After a batch, the adapters of the next queued requests are
prefetched into the host tier of the cache.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from sqlalchemy import select, update

from shared.db import Adapter, Generation
from shared.images import encode_png
from shared.models import BaseModelNotFound
from shared.queue import GENERATE_TASK
from shared.usage import Usage

from ..lease import Heartbeat, claim_next, finish, renew, wake_if_capped
from ..runtime import Runtime
from ..transient import DependencyUnavailable, retry_transient
from ..usage import count_usage, record_usage
from ..webhooks import notify

log = logging.getLogger("krona.worker.inference")

__all__ = ["engine_for", "run_generation_job"]


def engine_for(rt: Runtime):
    """The process's engine: the base pipeline loaded once, with adapter slots on every target layer."""
    key = f"engine:{rt.settings.base_model}"
    if key not in rt.pipelines:
        import torch

        from shared.models import load_pipeline

        from .engine import Engine

        settings = rt.settings
        device = settings.worker_device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else None
        pipe = load_pipeline(settings.base_model, torch_dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)

        def fetch(adapter_id: str) -> bytes:
            def read_key() -> str | None:
                with rt.sessions() as session:
                    return session.scalar(select(Adapter.storage_key).where(Adapter.id == adapter_id))

            window = settings.transient_retry_seconds
            storage_key = retry_transient(read_key, what=f"adapter {adapter_id}", window_seconds=window)
            if storage_key is None:
                raise KeyError(adapter_id)
            return retry_transient(
                lambda: rt.storage.get_bytes(storage_key), what=f"adapter {adapter_id}", window_seconds=window
            )

        rt.pipelines[key] = Engine(
            pipe,
            fetch=fetch,
            a_shape=(settings.engine_a1, settings.engine_a2),
            slots=settings.engine_slots,
            host_budget_bytes=settings.engine_host_cache_mb * 1024 * 1024,
            max_batch=settings.engine_max_batch,
        )
    return rt.pipelines[key]


def _gather(rt: Runtime, first: Generation) -> list[str]:
    """Claim queued generations compatible with ``first`` (same size, steps, guidance) that fit in the batch,
    each the fair scheduler's next pick among them, so that a batch mixes tenants' requests fairly."""
    settings = rt.settings
    if settings.engine_max_batch <= 1:
        return []
    time.sleep(settings.batch_wait_ms / 1000)
    taken, images = [], first.num_images
    with rt.sessions() as session:
        while images < settings.engine_max_batch:
            compatible = (
                Generation.width == first.width,
                Generation.height == first.height,
                Generation.steps == first.steps,
                Generation.guidance_scale == first.guidance_scale,
                Generation.num_images <= settings.engine_max_batch - images,
            )
            job_id = claim_next(session, Generation, settings, rt.owner, settings.lease_seconds, filters=compatible)
            if job_id is None:
                break
            taken.append(job_id)
            images += session.scalar(select(Generation.num_images).where(Generation.id == job_id))
    return taken


def _device(engine) -> str:
    import torch

    device = getattr(engine.pipe, "device", torch.device("cpu"))
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def run_generation_job(rt: Runtime, generation_id: str) -> str:
    from .engine import AdapterShapeError, Request

    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        # The message wakes this worker; the fair scheduler says which job it serves (shared/scheduler.py).
        first_id = claim_next(session, Generation, rt.settings, rt.owner, lease, message_job_id=generation_id)
        if first_id is None:
            return "skipped"
        first = session.get(Generation, first_id)
    ids = [first_id, *_gather(rt, first)]
    device = "none"  # until the engine loads
    rows: dict[str, Generation] = {}
    with rt.sessions() as session:
        for job_id in ids:
            rows[job_id] = session.get(Generation, job_id)
            session.expunge(rows[job_id])

    def retry(what: str, call):
        """Storage and database calls ride out an outage (workers/transient.py)."""
        return retry_transient(call, what=what, window_seconds=rt.settings.transient_retry_seconds)

    def end(job_id: str, status: str, usage: Usage, **values) -> None:
        """The final status and the usage record, in one transaction, by the lease owner only."""
        row = rows[job_id]

        def write() -> bool:
            with rt.sessions() as session:
                if status == "succeeded" and not renew(session, Generation, job_id, rt.owner, lease):
                    return False
                if not finish(session, Generation, job_id, rt.owner, status, commit=False, **values):
                    session.rollback()
                    return False
                record_usage(
                    session, tenant_id=row.tenant_id, kind="generation", job_id=job_id, status=status, usage=usage
                )
                session.commit()
                return True

        if retry(f"generation {job_id}: record the {'result' if status == 'succeeded' else 'failure'}", write):
            count_usage(
                tenant_id=row.tenant_id,
                kind="generation",
                status=status,
                usage=usage,
                max_tenants=rt.settings.metrics_max_tenants,
            )

    def fail(job_id: str, code: str, message: str, seconds: float = 0.0) -> None:
        end(job_id, "failed", Usage(seconds, device), error_code=code, error_message=message[:2000])
        notify(rt, Generation, "generation", job_id)

    try:
        engine = engine_for(rt)
    except BaseModelNotFound as exc:  # a removed or mistyped id: say so, do not retry as a lost worker
        for job_id in rows:
            fail(job_id, "base_model_not_found", str(exc))
        return "failed"
    device = _device(engine)
    runnable = []
    for job_id, row in rows.items():
        if row.adapter_id:

            def adapter_owner(adapter_id: str = row.adapter_id) -> str | None:
                with rt.sessions() as session:
                    return session.scalar(select(Adapter.tenant_id).where(Adapter.id == adapter_id))

            try:
                owner = retry(f"generation {job_id}: read the adapter", adapter_owner)
                if owner != row.tenant_id:
                    fail(job_id, "adapter_not_found", f"adapter {row.adapter_id} was deleted")
                    continue
                engine.slot_for(row.adapter_id)
            except AdapterShapeError as exc:
                fail(job_id, "adapter_unsupported", str(exc))
                continue
            except DependencyUnavailable as exc:
                fail(job_id, exc.code, str(exc))
                continue
        runnable.append(job_id)
    if not runnable:
        return "failed"
    requests = [
        Request(
            prompt=rows[j].prompt,
            adapter_id=rows[j].adapter_id,
            adapter_scale=rows[j].adapter_scale,
            negative_prompt=rows[j].negative_prompt,
            num_images=rows[j].num_images,
            seed=rows[j].seed,
        )
        for j in runnable
    ]
    with ExitStack() as heartbeats:  # one lease per request, renewed while the batch runs
        for job_id in runnable:
            heartbeats.enter_context(Heartbeat(rt.sessions, Generation, job_id, rt.owner, lease))
        _set_phase(rt, list(runnable), "generating")
        started = time.perf_counter()
        # The batch's time is shared among its requests in proportion to their cost (images x steps x pixels).
        total_cost = sum(max(rows[j].cost, 1e-9) for j in runnable)
        try:
            outputs = engine.run(
                requests, steps=first.steps, guidance_scale=first.guidance_scale, width=first.width, height=first.height
            )
        except (ValueError, RuntimeError) as exc:
            seconds = time.perf_counter() - started
            for job_id in runnable:
                fail(job_id, "generation_failed", str(exc), seconds * max(rows[job_id].cost, 1e-9) / total_cost)
            return "failed"
    batch_seconds = time.perf_counter() - started
    for job_id, images in zip(runnable, outputs, strict=True):
        row = rows[job_id]
        share = batch_seconds * max(row.cost, 1e-9) / total_cost
        storing = time.perf_counter()
        stored = []
        _set_phase(rt, [job_id], "uploading")
        try:
            for index, array in enumerate(images):
                key = f"tenants/{row.tenant_id}/generations/{job_id}/{index}.png"
                png = encode_png(array)
                retry(
                    f"generation {job_id}: store image {index}",
                    lambda key=key, png=png: rt.storage.put_bytes(key, png, content_type="image/png"),
                )
                stored.append({"index": index, "key": key, "seed": row.seed + index})
            usage = Usage(
                share + time.perf_counter() - storing,
                device,
                images=len(images),
                steps=row.steps,
                pixels=row.width * row.height * len(images),
            )
            end(job_id, "succeeded", usage, images=stored)
        except DependencyUnavailable as exc:
            fail(job_id, exc.code, str(exc), share)
            continue
        notify(rt, Generation, "generation", job_id)
    wake_if_capped(rt, Generation, GENERATE_TASK, {rows[j].tenant_id for j in runnable})
    _prefetch(rt, engine)
    log.info("batch of %d generations (%d images); cache %s", len(runnable), sum(map(len, outputs)), engine.stats())
    return "succeeded"


def _set_phase(rt: Runtime, job_ids: list[str], phase: str) -> None:
    """Record what these owned generations are doing (progress displays); a failed write is not worth a retry."""
    try:
        with rt.sessions() as session:
            session.execute(
                update(Generation)
                .where(Generation.id.in_(job_ids), Generation.status == "running", Generation.lease_owner == rt.owner)
                .values(phase=phase)
                .execution_options(synchronize_session=False)
            )
            session.commit()
    except Exception:
        log.warning("could not record phase %s of %s", phase, job_ids[:3])


def _prefetch(rt: Runtime, engine) -> None:
    """Load the adapters of the next queued requests into the host tier while the queue waits."""
    with rt.sessions() as session:
        upcoming = session.scalars(
            select(Generation.adapter_id)
            .where(Generation.status == "queued", Generation.adapter_id.is_not(None))
            .order_by(Generation.created_at)
            .limit(rt.settings.engine_slots)
        ).all()
    try:
        rt.storage.check()  # during a storage outage, skip: a fetch would wait out its retry window here
        engine.cache.prefetch(list(dict.fromkeys(upcoming)))
    except Exception:
        log.warning("prefetch failed", exc_info=True)
