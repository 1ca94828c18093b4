"""A training job of the service: claim the row, train with progress/cancel/checkpoints in storage, store the adapter.

Called by the Celery task with an id; everything it needs is re-read from the row and storage, so a
second delivery of the same message, or a delivery after a crash, does the right thing: it resumes
from the last checkpoint in storage, or does nothing if the job is owned or finished.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from shared.db import Adapter, JobStatus, Training, new_id
from shared.images import ImageLimits, SubjectImage, decode_image
from shared.krona import delete_adapter, krona_layers, load_adapter
from shared.models import BaseModelNotFound
from shared.queue import TRAIN_TASK
from shared.storage import BlobNotFound
from shared.storage import keys as blob_keys
from shared.training_spec import EvaluationRequest, TrainingSpec
from shared.usage import Usage
from workers.train_queue import run_train_queue_job

from ..drain import Drained, drain_requested, hand_over_training, unless_drained
from ..evaluation import evaluate_trained_adapter, interrupted_evaluation, record_of_training_evaluation
from ..lease import Heartbeat, renew, wake_if_capped
from ..outcome import end_job
from ..retention import purge_training_inputs
from ..runtime import Runtime
from ..transient import DependencyUnavailable, retry_transient
from . import TrainingCanceled, load_components, native_resolution, train
from .class_images import class_image_set

log = logging.getLogger("krona.worker.training")

__all__ = ["run_claimed_training", "run_training_job"]


def _checkpoint_archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    return buffer.getvalue()


def _unpack_checkpoint(data: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(into, filter="data")


def _components(rt: Runtime, base_model: str, spec: TrainingSpec):
    key = f"train:{base_model}:{spec.mixed_precision}"
    if key not in rt.pipelines:
        rt.pipelines[key] = load_components(
            base_model, device=rt.settings.worker_device, mixed_precision=spec.mixed_precision
        )
    return rt.pipelines[key]


def run_training_job(rt: Runtime, message_job_id: str) -> str:
    """A message of the train queue: claim the queue's fairest job (a training or an evaluation; a crashed one
    named by the message first) and run it; the final status, or 'skipped' when there was nothing to claim."""
    # Lazy: workers.train_queue imports this module to run the trainings it claims.

    return run_train_queue_job(rt, message_job_id)


def run_claimed_training(rt: Runtime, training_id: str) -> str:
    """Run (or resume) training ``training_id``, which this worker has just claimed; its final status."""
    claimed = _read_claimed(rt, training_id)
    attempt = _Attempt(rt, claimed)
    work = Path(tempfile.mkdtemp(prefix=f"krona-{claimed.training_id}-"))
    try:
        # The heartbeat keeps the lease through phases without progress writes (loading, class images).
        with Heartbeat(rt.sessions, Training, claimed.training_id, rt.owner, rt.settings.lease_seconds) as heartbeat:
            return attempt.run(work, heartbeat)
    finally:
        _purge_inputs(rt, claimed.training_id)
        wake_if_capped(rt, Training, TRAIN_TASK, {claimed.tenant_id})
        attempt.remove_adapter()
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _Claimed:
    """What the attempt reads from the training's row once, right after claiming it."""

    training_id: str
    tenant_id: str
    image_keys: list[str]
    checkpoint_key: str | None
    spec: TrainingSpec
    base_model: str
    name: str | None = None


def _read_claimed(rt: Runtime, training_id: str) -> _Claimed:
    settings = rt.settings
    with rt.sessions() as session:
        row = session.get(Training, training_id)
        spec = TrainingSpec.from_dict({**row.params, "instance_prompt": row.instance_prompt})
        spec = TrainingSpec.from_dict({**spec.to_dict(), "checkpoint_every": settings.checkpoint_every})
        return _Claimed(
            training_id=training_id,
            tenant_id=row.tenant_id,
            image_keys=list(row.image_keys),
            checkpoint_key=row.checkpoint_key,
            spec=spec,
            base_model=row.base_model,
            name=row.name,
        )


class _Attempt:
    """This worker's attempt at one claimed training: the storage and database calls around ``train`` (each
    riding out an outage, workers/transient.py) and the callbacks ``train`` makes (progress, the cancel flag,
    checkpoints). The final status is written only by the lease owner, with the attempt's usage."""

    def __init__(self, rt: Runtime, claimed: _Claimed) -> None:
        self.rt = rt
        self.claimed = claimed
        self.training_id = claimed.training_id
        self.lease = rt.settings.lease_seconds
        self.meter = _Meter(time.perf_counter(), claimed.spec.resolution or 0)
        self.components = None
        self.heartbeat: Heartbeat | None = None
        self._last_progress_write = 0.0

    def run(self, work: Path, heartbeat: Heartbeat) -> str:
        self.heartbeat = heartbeat
        try:
            images = self._read_images()
        except DependencyUnavailable as exc:
            return self.fail(exc.code, str(exc))
        except Exception as exc:
            return self.fail("images_unreadable", f"could not read the training images: {exc}")
        checkpoint_dir = work / "checkpoints"
        try:
            resume = self._restore_checkpoint(checkpoint_dir)
        except DependencyUnavailable as exc:
            return self.fail(exc.code, str(exc))
        spec = self.claimed.spec
        self.set_phase("loading_model")
        try:
            # Loading (or downloading) the model cannot stop half-way: on SIGTERM the job hands over at once.
            self.components = unless_drained(
                lambda: _components(self.rt, self.claimed.base_model, spec), "loading the base model"
            )
        except Drained:
            return hand_over_training(self.rt, self.training_id, None, self.on_checkpoint)
        except BaseModelNotFound as exc:  # a removed or mistyped id: say so, do not retry as a lost worker
            return self.fail("base_model_not_found", str(exc))
        try:
            result = train(
                spec,
                self.components,
                images,
                work / "adapter.safetensors",
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                on_progress=self.on_progress,
                should_cancel=self.should_cancel,
                on_checkpoint=self.on_checkpoint,
                on_phase=self.set_phase,
                class_image_cache=self._class_image_cache(),
            )
        except TrainingCanceled as stopped:
            if drain_requested() and not self.cancel_requested():  # SIGTERM: another worker resumes (drain.py)
                return hand_over_training(self.rt, self.training_id, stopped.checkpoint, self.on_checkpoint)
            self.end(JobStatus.CANCELED)
            return JobStatus.CANCELED
        except LeaseLost:
            log.warning("training %s: lease lost to another worker; stopping", self.training_id)
            return "lease_lost"
        except DependencyUnavailable as exc:
            return self.fail(exc.code, str(exc))
        except (ValueError, FloatingPointError) as exc:
            return self.fail("training_failed", str(exc))
        self.meter.step(result.steps)
        claimed = self.claimed
        evaluation = self._evaluate(result.adapter_path)
        self.set_phase("uploading")
        try:
            return _store_adapter(
                self.rt,
                self.training_id,
                claimed.tenant_id,
                claimed.base_model,
                spec,
                result.adapter_path,
                self.retry,
                self.meter.usage(self.components),
                evaluation,
                name=claimed.name,
            )
        except DependencyUnavailable as exc:
            return self.fail(exc.code, str(exc))

    def _evaluate(self, adapter_path: Path) -> dict | None:
        """params.evaluate: score the adapter against the subject's photos now, before they are purged
        (workers/evaluation.py); the scores go into the adapter's row with it."""
        request = self.claimed.spec.evaluation()
        if request is None:
            return None
        self.set_phase("evaluating")
        evaluate = partial(
            evaluate_trained_adapter,
            self.rt,
            request=request,
            instance_prompt=self.claimed.spec.instance_prompt,
            base_model=self.claimed.base_model,
            adapter_path=adapter_path,
            image_keys=self.claimed.image_keys,
        )
        try:
            return unless_drained(evaluate, "the adapter's evaluation")
        except Drained:  # SIGTERM: the adapter is stored now, unscored; scoring it again is one request away
            return interrupted_evaluation(
                self.rt, request, self.claimed.spec.instance_prompt, len(self.claimed.image_keys)
            )

    def retry(self, what: str, call):
        """Storage and database calls ride out an outage (workers/transient.py)."""
        window = self.rt.settings.transient_retry_seconds
        return retry_transient(call, what=f"training {self.training_id}: {what}", window_seconds=window)

    def end(self, status: str, **values) -> bool:
        """The final status and the usage record, by the lease owner only; then the webhook (workers/outcome.py)."""
        claimed = self.claimed
        usage = self.meter.usage(self.components)
        return end_job(self.rt, Training, self.training_id, kind="training", tenant_id=claimed.tenant_id,
                       status=status, usage=usage, **values)  # fmt: skip

    def fail(self, code: str, message: str) -> str:
        self.end(JobStatus.FAILED, error_code=code, error_message=message)
        return JobStatus.FAILED

    def _read_images(self) -> list[SubjectImage]:
        settings, storage = self.rt.settings, self.rt.storage
        limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)
        return [
            decode_image(self.retry("read the images", lambda k=k: storage.get_bytes(k)), Path(k).name, limits)
            for k in self.claimed.image_keys
        ]

    def _restore_checkpoint(self, into: Path) -> bool:
        """Unpack the training's checkpoint from storage into ``into``; False (start over) when there is none or
        it does not read. An outage of the storage raises DependencyUnavailable."""
        key = self.claimed.checkpoint_key
        if not key:
            return False
        try:
            data = self.retry("read the checkpoint", lambda: self.rt.storage.get_bytes(key))
        except DependencyUnavailable:
            raise
        except Exception:
            log.warning("checkpoint %s unreadable; starting over", key, exc_info=True)
            return False
        try:
            _unpack_checkpoint(data, into)
        except Exception:
            log.warning("checkpoint %s unreadable; starting over", key, exc_info=True)
            return False
        log.warning("training %s resumes from its checkpoint %s", self.training_id, key)
        return True

    def on_progress(self, p) -> None:
        # Progress is written at most twice a second; the heartbeat thread keeps the lease between.
        if self.heartbeat is not None and self.heartbeat.lost:
            raise LeaseLost(self.training_id)
        self.meter.step(p.step)
        now = time.monotonic()
        if now - self._last_progress_write < 0.5 and p.step < p.total_steps:
            return
        self._last_progress_write = now
        values = {
            "step": p.step,
            "total_steps": p.total_steps,
            "loss": p.loss,
            "eta_seconds": round(p.eta_seconds, 1),
        }
        if not self.retry("write progress", lambda: _renew(self.rt, self.training_id, self.lease, **values)):
            raise LeaseLost(self.training_id)

    def set_phase(self, phase: str) -> None:
        """Record what the job is doing now (shared/db/models.py: TRAINING_PHASES), for progress displays."""
        if not self.retry("write the phase", lambda: _renew(self.rt, self.training_id, self.lease, phase=phase)):
            raise LeaseLost(self.training_id)

    def _class_image_cache(self):
        spec = self.claimed.spec
        if not spec.prior_preservation:
            return None
        resolution = spec.resolution or native_resolution(self.components)
        name = class_image_set(self.claimed.base_model, spec, resolution)
        return StorageClassImageCache(self.rt, self.claimed.tenant_id, name, self.retry)

    def should_cancel(self) -> bool:
        # A draining worker stops like a cancel (a checkpoint of this step), then hands the training over.
        return drain_requested() or self.cancel_requested()

    def cancel_requested(self) -> bool:
        def read() -> bool:
            with self.rt.sessions() as session:
                return bool(session.scalar(select(Training.cancel_requested).where(Training.id == self.training_id)))

        return self.retry("read the cancel flag", read)

    def on_checkpoint(self, folder: Path) -> None:
        rt, training_id = self.rt, self.training_id
        key = blob_keys.training_checkpoint(self.claimed.tenant_id, training_id)
        temporary = rt.storage.temporary_key(key)
        archive = _checkpoint_archive(folder)
        self.retry("store the checkpoint", lambda: rt.storage.put_bytes(temporary, archive))
        self.retry("store the checkpoint", lambda: rt.storage.commit(temporary, key))
        if not self.retry("record the checkpoint", lambda: _renew(rt, training_id, self.lease, checkpoint_key=key)):
            raise LeaseLost(training_id)

    def remove_adapter(self) -> None:
        """The worker keeps the components for the next job: take this training's factors out of the UNet."""
        components = self.components
        if components is not None and any(
            "default" in layer.krona_a for layer in krona_layers(components.unet).values()
        ):
            delete_adapter(components.unet, "default")


class LeaseLost(Exception):
    pass


class StorageClassImageCache:
    """A training's class images in storage, one PNG per index under ``prefix`` (the tenant's trainings of the
    same class share them: workers/training/class_images.py). A missing or unreadable image is made again."""

    def __init__(self, rt: Runtime, tenant_id: str, set_name: str, retry) -> None:
        self.rt, self.tenant_id, self.set_name, self.retry = rt, tenant_id, set_name, retry

    def key(self, index: int) -> str:
        return blob_keys.class_image(self.tenant_id, self.set_name, index)

    def get(self, index: int) -> bytes | None:
        try:
            return self.retry("read a class image", lambda: self.rt.storage.get_bytes(self.key(index)))
        except BlobNotFound:
            return None

    def put(self, index: int, png: bytes) -> None:
        self.retry("store a class image", lambda: self.rt.storage.put_bytes(self.key(index), png))


def _purge_inputs(rt: Runtime, training_id: str) -> None:
    """The subject's photos and the checkpoint go when the training has ended (unless KRONA_KEEP_TRAINING_IMAGES);
    a storage fault is left to the reaper's next retention pass (workers/retention.py)."""
    try:
        purge_training_inputs(rt, training_id)
    except Exception:
        log.warning("training %s: could not delete its inputs yet; the retention pass will", training_id, exc_info=True)


class _Meter:
    """This attempt's usage: wall-clock seconds since the claim and the steps it ran (a resumed training
    counts from its checkpoint)."""

    def __init__(self, started: float, resolution: int) -> None:
        self.started = started
        self.resolution = resolution
        self.first: int | None = None
        self.last = 0

    def step(self, step: int) -> None:
        if self.first is None:
            self.first = step
        self.last = max(self.last, step)

    def usage(self, components) -> Usage:
        steps = 0 if self.first is None else self.last - self.first + 1
        device = str(components.device) if components is not None else "cpu"
        if components is not None and components.device.type == "cuda":
            device = f"cuda:{torch.cuda.get_device_name(components.device)}"
        size = self.resolution
        if not size and components is not None:
            size = native_resolution(components)
        return Usage(time.perf_counter() - self.started, device, steps=steps, pixels=steps * size * size)


def _renew(rt: Runtime, training_id: str, lease: int, **values) -> bool:
    with rt.sessions() as session:
        return renew(session, Training, training_id, rt.owner, lease, **values)


def _store_adapter(
    rt: Runtime,
    training_id: str,
    tenant_id: str,
    base_model: str,
    spec: TrainingSpec,
    path: Path,
    retry,
    usage: Usage,
    evaluation: dict | None = None,
    *,
    name: str | None = None,
) -> str:
    """Store the adapter file, then end the training as succeeded with the adapter's row (and its evaluation) in
    the same transaction, by the lease owner only; "lease_lost" (and the file deleted) otherwise."""
    data = Path(path).read_bytes()
    state, config, _ = load_adapter(path)
    adapter_id = new_id("adp")
    key = blob_keys.adapter_file(tenant_id, adapter_id)
    temporary = rt.storage.temporary_key(key)
    retry("store the adapter", lambda: rt.storage.put_bytes(temporary, data))
    # The adapter keeps what it was trained with: the training's name, instance prompt and identifier.
    identifier = (spec.evaluation() or EvaluationRequest()).subject_words(spec.instance_prompt)[0][:100] or None
    row = dict(
        id=adapter_id,
        tenant_id=tenant_id,
        name=name,
        instance_prompt=spec.instance_prompt,
        identifier=identifier,
        base_model=base_model,
        config=config.to_metadata(),
        num_parameters=int(sum(t.numel() for t in state.values())),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key=key,
        training_id=training_id,
    )

    def with_status(session) -> None:
        session.add(Adapter(**row))
        session.flush()  # the adapter exists before the training (or its evaluation) points at it
        if evaluation is not None:  # params.evaluate: its result, recorded with the adapter
            session.add(record_of_training_evaluation(evaluation, tenant_id, adapter_id, base_model))
        try:
            rt.storage.commit(temporary, key)
        except BlobNotFound:  # a retry after a database fault: the file was committed the first time
            if not rt.storage.exists(key):
                raise

    try:
        ended = end_job(rt, Training, training_id, kind="training", tenant_id=tenant_id, status=JobStatus.SUCCEEDED,
                        usage=usage, with_status=with_status, adapter_id=adapter_id)  # fmt: skip
    except IntegrityError:  # adapters.training_id is unique: a training never gets two adapters
        ended = False
    if not ended:
        rt.storage.delete(key)
        rt.storage.delete(temporary)
        return "lease_lost"
    return JobStatus.SUCCEEDED
