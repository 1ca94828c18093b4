"""Generation jobs on the resident engine, served by step-level joining (one group of running loops per task).

A task's message wakes the worker; it claims the job the fair scheduler picks (the oldest queued request of the
tenant served least so far, shared/scheduler.py) and runs a denoising loop for that job's size
(``DenoisingLoop``, workers/inference/loop.py). The loop never waits for company:

- joining: at every step boundary, while there is room (``KRONA_ENGINE_MAX_BATCH`` images in flight), the worker
  asks the fair scheduler for its next pick among all queued generations (the running-jobs cap of each tenant
  applies, so a tenant's share stays capped). If its adapter can get a slot, it is claimed (its tenant charged)
  and joins before the next step: the loop of its size (any adapter, scale, seed, steps or guidance), or a loop of
  its own beside the others when it is of another size (``LoopGroup``: the loops take turns, a step each, and
  share the bound on images and the adapter slots). If the fairest request cannot join now (no room for its
  images, no free slot), nobody joins until a request leaves: no tenant overtakes a fairer one;
- leaving: a finished request leaves at once; its images are decoded, then stored and its row finished (with
  its usage, by the lease owner, in one transaction) by a background thread while the loop goes on;
- each request has its own lease with a heartbeat; one whose lease was taken over, or whose cancel was asked
  for (``cancel_requested``), leaves at the next step; a request that cannot join (its adapter deleted, of
  another shape, unreadable) fails alone;
- drain (SIGTERM, workers/drain.py): no request joins after the flag; the running ones finish, are stored, and
  the task returns.

A request's usage is its share of each step it took part in (by its UNet rows: images, doubled with
classifier-free guidance), plus its own preparation (prompt encoding, adapter load), decode and store time.
After the loop, the adapters of the next queued requests are prefetched into the host tier of the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from sqlalchemy import select, update

from shared.db import Adapter, Generation, JobStatus
from shared.images import encode_png
from shared.models import BaseModelNotFound
from shared.queue import GENERATE_TASK
from shared.scheduler import charge, pick
from shared.storage import keys as blob_keys
from shared.usage import Usage

from ..drain import drain_requested
from ..lease import MAX_ATTEMPTS, Heartbeat, claim, claim_next, wake_if_capped
from ..outcome import end_job
from ..runtime import Runtime
from ..transient import DependencyUnavailable, retry_transient

log = logging.getLogger("krona.worker.inference")

__all__ = ["engine_for", "run_generation_job"]


def engine_for(rt: Runtime):
    """The process's engine: the base pipeline loaded once, with adapter slots on every target layer."""
    key = f"engine:{rt.settings.base_model}"
    if key not in rt.pipelines:
        # lazy: loads torch, tqdm
        import torch

        # lazy: loads torch, diffusers
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
            a_shape=settings.engine_a_shape,
            slots=settings.engine_slots,
            host_budget_bytes=settings.engine_host_cache_mb * 1024 * 1024,
            max_batch=settings.engine_max_batch,
        )
    return rt.pipelines[key]


def _device(engine) -> str:
    # lazy: loads torch, tqdm
    import torch

    device = getattr(engine.pipe, "device", torch.device("cpu"))
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def run_generation_job(rt: Runtime, generation_id: str) -> str:
    """Claim the fairest queued generation and run a denoising loop for its size that others join, of its size
    or in loops of their own (module doc).
    Returns succeeded (at least one request succeeded), failed, canceled, or skipped (nothing to claim)."""
    with rt.sessions() as session:
        # The message wakes this worker; the fair scheduler says which job it serves (shared/scheduler.py).
        first_id = claim_next(
            session, Generation, rt.settings, rt.owner, rt.settings.lease_seconds, message_job_id=generation_id
        )
    if first_id is None:
        return "skipped"
    return _LoopServer(rt).serve(first_id)


@dataclass
class _Member:
    """A claimed request, from the worker's side: its row (detached), its lease's heartbeat, its own time."""

    row: Generation
    heartbeat: Heartbeat
    own_seconds: float = 0.0  # reading its adapter's owner, joining (the loop's own part is in Denoising)


# How often the running requests' rows are read for a cancel (a read per step would cost more than it saves).
CANCEL_CHECK_SECONDS = 0.5
# After the fairest waiting request turned out not to be for the loop (another size, too many images, no free
# slot), the next look waits this long or until a request leaves: that request stays the fairest meanwhile
# unless another worker takes it, and each look costs a few queries.
UNFIT_RECHECK_SECONDS = 0.5


class _LoopServer:
    """One task's denoising loops (one per size) and the leases, rows and usage of the requests in them."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.lease = rt.settings.lease_seconds
        self.device = "none"  # until the engine loads
        self.members: dict[str, _Member] = {}
        self.outcomes: dict[str, str] = {}
        self.tenants: set[str] = set()
        self.steps = 0
        self.sizes: set[str] = set()  # of the loops requests joined (the log line)
        self.cancel_checked = 0.0
        self.next_look = 0.0  # when to look for requests to join next (UNFIT_RECHECK_SECONDS)
        self.claim_fault_logged = False
        self.stores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="krona-store")
        self.storing: list[Future] = []
        self.lock = threading.Lock()  # outcomes, written by the store thread too

    # The loop ------------------------------------------------------------------------------------------------

    def serve(self, first_id: str) -> str:
        # lazy: loads torch, diffusers, PIL, …
        from .loop import LoopGroup

        first = self._read(first_id)
        self.tenants.add(first.tenant_id)
        try:
            engine = engine_for(self.rt)
        except BaseModelNotFound as exc:  # a removed or mistyped id: say so, do not retry as a lost worker
            self._end_unjoined(first, JobStatus.FAILED, error_code="base_model_not_found", error_message=str(exc))
            return JobStatus.FAILED
        self.device = _device(engine)
        loops = LoopGroup(engine, max_images=max(self.rt.settings.engine_max_batch, first.num_images))
        try:
            self._admit(loops, first)
            while True:
                self._admit_joiners(loops)
                self._drop_stopped(loops)
                if not loops.active:
                    # Requests still being stored count against their tenants' running caps: once they are
                    # finished, look again for someone to join before the loop ends.
                    if self._wait_for_stores():
                        continue
                    break
                for loop in loops.running():  # a step each, in turn
                    self._step(loop)
        finally:
            self.stores.shutdown(wait=True)
            for member in self.members.values():  # only after an unexpected error: their leases expire, the
                member.heartbeat.__exit__(None, None, None)  # reaper sends them again
        wake_if_capped(self.rt, Generation, GENERATE_TASK, self.tenants)
        _prefetch(self.rt, engine)
        log.info("loops %s: %d generations in %d steps (%s); cache %s", ", ".join(sorted(self.sizes)),
                 len(self.outcomes), self.steps, _count(self.outcomes.values()), engine.stats())  # fmt: skip
        if JobStatus.SUCCEEDED in self.outcomes.values():
            return JobStatus.SUCCEEDED
        return (
            JobStatus.CANCELED
            if self.outcomes and set(self.outcomes.values()) == {JobStatus.CANCELED}
            else JobStatus.FAILED
        )

    def _step(self, loop) -> None:
        """One step of one loop; its finished requests are decoded, then stored by the store thread."""
        try:
            finished = loop.step()
        except (ValueError, RuntimeError) as exc:  # the UNet batch itself failed (out of memory, ...)
            log.exception("a denoising step failed; failing the %d requests in it", len(loop.active))
            for d in list(loop.active):
                loop.leave(d.key)
                self._end_member(d.key, d, JobStatus.FAILED, error_code="generation_failed", error_message=str(exc))
            return
        self.steps += 1
        if finished:
            self.next_look = 0.0  # room, or a slot, was freed
        for d in finished:
            try:
                images = loop.decode(d)
            except (ValueError, RuntimeError) as exc:
                log.exception("generation %s: decoding failed", d.key)
                self._end_member(d.key, d, JobStatus.FAILED, error_code="generation_failed", error_message=str(exc))
                continue
            # Stored by the store thread while the loops take their next steps.
            self.storing.append(self.stores.submit(self._store, self.members.pop(d.key), d, images))

    def _wait_for_stores(self) -> bool:
        """Wait for the requests being stored; whether there were any."""
        pending = [future for future in self.storing if not future.done()]
        self.storing.clear()
        if pending:
            wait(pending)
        return bool(pending)

    def _admit_joiners(self, loops) -> None:
        """Claim the fair scheduler's next picks while they fit (module doc), and join each to its size's loop."""
        if drain_requested():  # SIGTERM: the running requests finish, nobody new joins
            return
        if time.monotonic() < self.next_look:
            return
        while loops.room > 0:
            try:
                job_id = self._claim_joiner(loops)
            except Exception as exc:  # the database is away: the running requests go on; try at the next step
                if not self.claim_fault_logged:
                    log.warning("could not look for requests to join (%s); the loop goes on", exc.__class__.__name__)
                    self.claim_fault_logged = True
                return
            if job_id is None:
                return
            self._admit(loops, self._read(job_id))

    def _claim_joiner(self, loops) -> str | None:
        """Claim the fairest queued generation if it can join now (room for its images, a slot for its adapter;
        of any size: it joins the loop of its size, or starts one); else None (nobody joins)."""
        rt = self.rt
        with rt.sessions() as session:
            for _ in range(8):
                candidate = pick(session, Generation, rt.settings, filters=(Generation.attempts < MAX_ATTEMPTS,))
                if candidate is None:
                    session.rollback()
                    return None
                row = session.execute(
                    select(Generation.width, Generation.height, Generation.num_images, Generation.adapter_id).where(
                        Generation.id == candidate.job_id
                    )
                ).one_or_none()
                fits = row is not None and row.num_images <= loops.room and loops.can_host(row.adapter_id)
                if not fits:  # the fairest request cannot join now: nobody overtakes it
                    session.rollback()
                    self.next_look = time.monotonic() + UNFIT_RECHECK_SECONDS
                    return None
                if claim(session, Generation, candidate.job_id, rt.owner, self.lease, commit=False):
                    charge(session, Generation, candidate.tenant_id, candidate.cost, candidate.weight)
                    session.commit()
                    return candidate.job_id
                session.rollback()  # another worker took it first: pick again
        return None

    def _admit(self, loops, row: Generation) -> None:
        """Start the request's lease heartbeat and join it to the loop of its size (started if need be); a request
        that cannot join fails alone."""
        # lazy: loads torch, tqdm
        from .engine import AdapterShapeError, Request

        self.tenants.add(row.tenant_id)
        loop = loops.loop(row.width, row.height)
        member = _Member(row, Heartbeat(self.rt.sessions, Generation, row.id, self.rt.owner, self.lease))
        member.heartbeat.__enter__()
        self.members[row.id] = member
        _set_phase(self.rt, [row.id], "generating")
        started = time.perf_counter()

        def failed(code: str, message: str) -> None:
            member.own_seconds += time.perf_counter() - started
            self._end_member(row.id, None, JobStatus.FAILED, error_code=code, error_message=message)

        if row.adapter_id:

            def adapter_owner(adapter_id: str = row.adapter_id) -> str | None:
                with self.rt.sessions() as session:
                    return session.scalar(select(Adapter.tenant_id).where(Adapter.id == adapter_id))

            try:
                owner = self._retry(f"generation {row.id}: read the adapter", adapter_owner)
            except DependencyUnavailable as exc:
                return failed(exc.code, str(exc))
            if owner != row.tenant_id:
                loops.engine.evict(row.adapter_id, loops.pinned())  # its factors need not stay cached
                return failed("adapter_not_found", f"adapter {row.adapter_id} was deleted")
        request = Request(
            prompt=row.prompt,
            adapter_id=row.adapter_id,
            adapter_scale=row.adapter_scale,
            negative_prompt=row.negative_prompt,
            num_images=row.num_images,
            seed=row.seed,
        )
        try:
            loop.join(row.id, request, steps=row.steps, guidance_scale=row.guidance_scale)
        except AdapterShapeError as exc:
            return failed("adapter_unsupported", str(exc))
        except DependencyUnavailable as exc:
            return failed(exc.code, str(exc))
        except KeyError:  # its file's row went away between the check and the fetch
            return failed("adapter_not_found", f"adapter {row.adapter_id} was deleted")
        except Exception as exc:  # this request only: the others in the loop go on
            log.exception("generation %s could not join the loop", row.id)
            return failed("generation_failed", f"{exc.__class__.__name__}: {exc}")
        member.own_seconds += time.perf_counter() - started
        self.sizes.add(f"{loop.width}x{loop.height}")

    def _drop_stopped(self, loops) -> None:
        """Requests whose lease another worker took over leave without a word; canceled ones end as canceled."""
        for job_id, member in list(self.members.items()):
            if member.heartbeat.lost:
                log.warning("generation %s: lease lost to another worker; it leaves the loop", job_id)
                loops.leave(job_id)
                self.members.pop(job_id).heartbeat.__exit__(None, None, None)
                self.next_look = 0.0
        now = time.monotonic()  # POST /v1/generations/{id}/cancel sets cancel_requested on a running one
        if not self.members or now - self.cancel_checked < CANCEL_CHECK_SECONDS:
            return
        self.cancel_checked = now
        try:
            with self.rt.sessions() as session:
                canceled = session.scalars(
                    select(Generation.id).where(
                        Generation.id.in_(list(self.members)), Generation.cancel_requested.is_(True)
                    )
                ).all()
        except Exception:  # the database is away: look again later
            return
        for job_id in canceled:
            d = loops.leave(job_id)
            if d is not None:
                self._end_member(job_id, d, JobStatus.CANCELED)
                self.next_look = 0.0

    # Ends ----------------------------------------------------------------------------------------------------

    def _store(self, member: _Member, d, images: list) -> None:
        """In the store thread: the PNGs to storage, then the row succeeded with its usage."""
        row = member.row
        try:
            _set_phase(self.rt, [row.id], "uploading")
            storing = time.perf_counter()
            stored = []
            for index, array in enumerate(images):
                key = blob_keys.generation_image(row.tenant_id, row.id, index)
                png = encode_png(array)
                self._retry(
                    f"generation {row.id}: store image {index}",
                    lambda key=key, png=png: self.rt.storage.put_bytes(key, png, content_type="image/png"),
                )
                stored.append({"index": index, "key": key, "seed": row.seed + index})
            member.own_seconds += time.perf_counter() - storing
            self._end_member(row.id, d, JobStatus.SUCCEEDED, member=member, images=stored)
        except DependencyUnavailable as exc:
            self._end_member(row.id, d, JobStatus.FAILED, member=member, error_code=exc.code, error_message=str(exc))
        except Exception as exc:
            log.exception("generation %s: storing its images failed", row.id)
            self._end_member(row.id, d, JobStatus.FAILED, member=member, error_code="generation_failed",
                             error_message=f"{exc.__class__.__name__}: {exc}")  # fmt: skip

    def _end_member(self, job_id: str, d, status: str, *, member: _Member | None = None, **values) -> None:
        """End a request that was admitted: stop its heartbeat, write its final status and usage, notify."""
        member = member or self.members.pop(job_id)
        try:
            seconds = member.own_seconds  # its admission (joining included) and its store
            if d is not None:
                seconds += d.unet_seconds + d.decode_seconds
            row = member.row
            usage = Usage(seconds, self.device)
            if status == JobStatus.SUCCEEDED:
                images = len(values["images"])
                usage = Usage(seconds, self.device, images=images, steps=row.steps,
                              pixels=row.width * row.height * images)  # fmt: skip
            self._end(row, status, usage, **values)
        finally:
            member.heartbeat.__exit__(None, None, None)

    def _end_unjoined(self, row: Generation, status: str, **values) -> None:
        self._end(row, status, Usage(0.0, self.device), **values)

    def _end(self, row: Generation, status: str, usage: Usage, **values) -> None:
        """The final status and the usage record, by the lease owner only; then the webhook (workers/outcome.py).
        A success renews the lease first: a request whose lease lapsed during its last steps is not this worker's."""
        try:
            lease = self.lease if status == JobStatus.SUCCEEDED else None
            written = end_job(self.rt, Generation, row.id, kind="generation", tenant_id=row.tenant_id, status=status,
                              usage=usage, renew_lease=lease, **values)  # fmt: skip
        except DependencyUnavailable:  # the database stayed away: the lease expires and the reaper sends it again
            log.warning("generation %s: could not record the %s status", row.id, status)
            return
        if written:
            with self.lock:
                self.outcomes[row.id] = status

    # Helpers -------------------------------------------------------------------------------------------------

    def _read(self, job_id: str) -> Generation:
        with self.rt.sessions() as session:
            row = session.get(Generation, job_id)
            session.expunge(row)
        return row

    def _retry(self, what: str, call):
        """Storage and database calls ride out an outage (workers/transient.py)."""
        return retry_transient(call, what=what, window_seconds=self.rt.settings.transient_retry_seconds)


def _count(statuses) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"


def _set_phase(rt: Runtime, job_ids: list[str], phase: str) -> None:
    """Record what these owned generations are doing (progress displays); a failed write is not worth a retry."""
    try:
        with rt.sessions() as session:
            session.execute(
                update(Generation)
                .where(
                    Generation.id.in_(job_ids),
                    Generation.status == JobStatus.RUNNING,
                    Generation.lease_owner == rt.owner,
                )
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
            .where(Generation.status == JobStatus.QUEUED, Generation.adapter_id.is_not(None))
            .order_by(Generation.created_at)
            .limit(rt.settings.engine_slots)
        ).all()
    try:
        rt.storage.check()  # during a storage outage, skip: a fetch would wait out its retry window here
        engine.cache.prefetch(list(dict.fromkeys(upcoming)))
    except Exception:
        log.warning("prefetch failed", exc_info=True)
