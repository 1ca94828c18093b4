"""Scoring an adapter in the service: CLIP-I, CLIP-T and DINO (shared/eval), recorded in ``evaluations``.

Two ways in:
- ``params.evaluate`` on a training: ``evaluate_trained_adapter`` runs in the training job, after ``train`` and
  before the adapter row is written and the subject's photos are purged (workers/retention.py), so the photos
  are the reference images; the training succeeds with its adapter already scored, and its result is an
  ``evaluations`` row written with the adapter (``record_of_training_evaluation``). A failed evaluation does not
  fail the training: the row says ``failed`` with the error.
- ``POST /v1/adapters/{id}/evaluations`` (uploaded reference photos): the gateway stores the photos and inserts a
  queued ``evaluations`` row, a job of the train queue like a training: counted in the tenant's queued jobs,
  charged its cost (shared/scheduler.py: evaluation_cost), taken in fair order with the trainings
  (workers/train_queue.py), leased with a heartbeat (a crashed worker's evaluation is taken over once the lease
  expires; the reaper sends it again), and metered (a usage record of kind ``evaluation``).
  ``run_claimed_evaluation`` runs it.

The images are generated with the base model loaded by ``shared.eval.run`` (freed before the scoring models
load); models come from ``KRONA_EVAL_CLIP_MODEL`` / ``KRONA_EVAL_DINO_MODEL``. The identifier and class noun
are client text: they fill the trusted DreamBooth templates once, literally (shared/eval/prompts.py), and the
reference images are decoded with the upload limits (shared/images.py).

The uploaded reference photos are deleted when the evaluation ends, on every path: by the worker that writes
its result, by the reaper that gives up on it (attempts used up), with the adapter's folder when the adapter is
deleted, by the gateway when a newer request replaces a queued one; a worker whose lease was taken over leaves
them to the new holder. (The storage sweep, workers/retention.py, is the net under a crash.)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import select

from shared.db import Adapter, Evaluation, JobStatus, utcnow
from shared.eval.prompts import check_subject_word, prompt_templates
from shared.images import ImageLimits
from shared.queue import EVALUATE_TASK
from shared.settings import Settings
from shared.training_spec import EvaluationRequest
from shared.usage import Usage

from .drain import Drained, release_lease, unless_drained
from .lease import Heartbeat
from .outcome import end_job
from .runtime import Runtime
from .transient import retry_transient

log = logging.getLogger("krona.worker.evaluation")

__all__ = [
    "evaluate_trained_adapter",
    "interrupted_evaluation",
    "record_of_training_evaluation",
    "run_claimed_evaluation",
    "run_evaluation_job",
    "score_adapter",
]


def score_adapter(
    *,
    base_model: str,
    adapter_path: Path,
    reference_dir: Path,
    state: dict[str, Any],
    device: str,
    work: Path,
    image_limits: ImageLimits | None = None,
) -> dict[str, float]:
    """{clip_i, clip_t, dino} of the adapter: the first ``state["prompts"]`` evaluation prompts for the class,
    ``images_per_prompt`` images each (seeds 0..n-1), against the images in ``reference_dir``."""
    # Lazy: shared.eval.run loads torch (1.7 s); this module is imported where no model runs (the dispatcher).
    from shared.eval.run import evaluate

    identifier, class_noun = _subject_words(state)
    # The templates themselves, filled in once by `evaluate` (the client's words are never a template).
    templates = prompt_templates("default", class_noun)[: state["prompts"]]
    report = evaluate(
        base=base_model,
        adapter=str(adapter_path),
        images_dir=reference_dir,
        class_noun=class_noun,
        out_dir=work / "out",
        identifier=identifier,
        prompts=templates,
        per_prompt=state["images_per_prompt"],
        steps=state["steps"],
        clip_model=state["models"]["clip"],
        dino_model=state["models"]["dino"],
        device=device,
        image_limits=image_limits,
    )
    return {metric: float(report.scores[metric]) for metric in ("clip_i", "clip_t", "dino")}


def _subject_words(state: dict[str, Any]) -> tuple[str, str]:
    """(identifier, class noun) of the evaluation, checked before anything is downloaded (ValueError)."""
    identifier = check_subject_word("the identifier", state["identifier"])
    class_noun = check_subject_word("the class noun", state["class_noun"])
    if not class_noun.strip():
        raise ValueError("the class noun is empty")
    return identifier, class_noun


def _image_limits(settings: Settings) -> ImageLimits:
    """The reference images are the subject's photos: decoded with the upload limits."""
    return ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)


def _write_references(into: Path, named_bytes: list[tuple[str, bytes]]) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for index, (name, data) in enumerate(named_bytes):
        (into / f"{index:02d}{Path(name).suffix.lower() or '.png'}").write_bytes(data)
    return into


def _scored(state: dict[str, Any], scores: dict[str, float]) -> dict[str, Any]:
    return {**state, **scores, "status": JobStatus.SUCCEEDED, "error": None, "finished_at": utcnow().isoformat()}


def _failed(state: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    error = {"code": code, "message": message[:2000]}
    return {**state, "status": JobStatus.FAILED, "error": error, "finished_at": utcnow().isoformat()}


def evaluate_trained_adapter(
    rt: Runtime,
    *,
    request: EvaluationRequest,
    instance_prompt: str,
    base_model: str,
    adapter_path: Path,
    image_keys: list[str],
) -> dict[str, Any]:
    """Score a freshly trained adapter against the training's photos (still in storage); the evaluation JSON
    for its adapter row, ``status`` succeeded or failed (never raises: the training stands either way)."""
    settings = rt.settings
    state = request.initial_state(
        instance_prompt=instance_prompt,
        clip_model=settings.eval_clip_model,
        dino_model=settings.eval_dino_model,
        reference_images=len(image_keys),
        requested_at=utcnow().isoformat(),
        status=JobStatus.RUNNING,
    )
    work = Path(tempfile.mkdtemp(prefix="krona-eval-"))
    try:
        _subject_words(state)
        photos = [(key, rt.storage.get_bytes(key)) for key in image_keys]
        references = _write_references(work / "references", photos)
        scores = score_adapter(
            base_model=base_model,
            adapter_path=adapter_path,
            reference_dir=references,
            state=state,
            device=settings.worker_device,
            work=work,
            image_limits=_image_limits(settings),
        )
        return _scored(state, scores)
    except Exception as exc:
        log.warning("evaluation of a trained adapter failed", exc_info=True)
        return _failed(state, "evaluation_failed", f"{exc.__class__.__name__}: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record_of_training_evaluation(state: dict[str, Any], tenant_id: str, adapter_id: str, base_model: str):
    """The ``evaluations`` row of a training's own evaluation (params.evaluate), already ended: its work was
    charged and metered with the training's."""
    error = state.get("error") or {}
    now = utcnow()
    return Evaluation(
        tenant_id=tenant_id,
        adapter_id=adapter_id,
        base_model=base_model,
        status=state["status"],
        params=_params_of(state),
        reference_keys=[],
        scores={k: state.get(k) for k in ("clip_i", "clip_t", "dino")}
        if state["status"] == JobStatus.SUCCEEDED
        else None,
        error_code=error.get("code"),
        error_message=error.get("message"),
        started_at=now,
        finished_at=now,
    )


def interrupted_evaluation(
    rt: Runtime, request: EvaluationRequest, instance_prompt: str, reference_images: int
) -> dict[str, Any]:
    """The state of a training's evaluation cut short by a drain (SIGTERM): failed, with how to score it again."""
    state = request.initial_state(
        instance_prompt=instance_prompt,
        clip_model=rt.settings.eval_clip_model,
        dino_model=rt.settings.eval_dino_model,
        reference_images=reference_images,
        requested_at=utcnow().isoformat(),
        status=JobStatus.RUNNING,
    )
    message = "the worker shut down during the evaluation; score the adapter with POST /v1/adapters/{id}/evaluations"
    return _failed(state, "evaluation_interrupted", message)


def _params_of(state: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation row keeps of a request's state (shared/training_spec.py: EvaluationRequest.initial_state)."""
    keys = ("prompts", "images_per_prompt", "steps", "class_noun", "identifier", "models", "reference_images")
    return {key: state.get(key) for key in keys}


def run_evaluation_job(rt: Runtime, message_job_id: str) -> str:
    """A message of the train queue (``krona.evaluate``): like ``krona.train``, it claims the queue's fairest job,
    a training or an evaluation (workers/train_queue.py), and runs it."""
    # Lazy: workers.train_queue imports this module to run the evaluations it claims.
    from workers.train_queue import run_train_queue_job  # here: train_queue.py imports this module

    return run_train_queue_job(rt, message_job_id)


@dataclass(frozen=True)
class _Claimed:
    evaluation_id: str
    tenant_id: str
    adapter_key: str
    base_model: str
    params: dict[str, Any]
    reference_keys: list[str]


def _read_claimed(rt: Runtime, evaluation_id: str) -> _Claimed | None:
    with rt.sessions() as session:
        row = session.execute(
            select(Evaluation, Adapter.storage_key)
            .join(Adapter, Adapter.id == Evaluation.adapter_id)
            .where(Evaluation.id == evaluation_id)
        ).first()
        if row is None:  # its adapter (and so the evaluation) was deleted meanwhile
            return None
        evaluation, adapter_key = row
        return _Claimed(
            evaluation_id=evaluation.id,
            tenant_id=evaluation.tenant_id,
            adapter_key=adapter_key,
            base_model=evaluation.base_model,
            params=dict(evaluation.params),
            reference_keys=list(evaluation.reference_keys or []),
        )


def _delete_references(rt: Runtime, keys: list[str]) -> None:
    for key in keys:
        try:
            rt.storage.delete(key)
        except Exception:  # the storage sweep (workers/retention.py) takes what is left
            log.warning("could not delete evaluation image %s", key, exc_info=True)


def run_claimed_evaluation(rt: Runtime, evaluation_id: str) -> str:
    """Run evaluation ``evaluation_id``, which this worker has just claimed: score the adapter against the
    uploaded reference photos, then write the result with the usage record, by the lease owner only. The final
    status, or 'lease_lost' when another worker took it over or its adapter was deleted meanwhile.

    The reference photos are deleted when the evaluation ends, on every path (a worker whose lease was taken over
    leaves them to the new holder; the reaper deletes those of one it gives up on; the storage sweep is the net)."""
    claimed = _read_claimed(rt, evaluation_id)
    if claimed is None:
        return "lease_lost"
    started = time.perf_counter()
    state = {**claimed.params, "images_per_prompt": claimed.params.get("images_per_prompt", 1)}
    work = Path(tempfile.mkdtemp(prefix=f"krona-eval-{evaluation_id}-"))
    values: dict[str, Any]
    try:
        with Heartbeat(rt.sessions, Evaluation, evaluation_id, rt.owner, rt.settings.lease_seconds):
            _subject_words(state)
            adapter_path = work / "adapter.safetensors"
            adapter_path.write_bytes(rt.storage.get_bytes(claimed.adapter_key))
            photos = [(key, rt.storage.get_bytes(key)) for key in claimed.reference_keys]
            references = _write_references(work / "references", photos)
            score = partial(
                score_adapter,
                base_model=claimed.base_model,
                adapter_path=adapter_path,
                reference_dir=references,
                state=state,
                device=rt.settings.worker_device,
                work=work,
                image_limits=_image_limits(rt.settings),
            )
            # Generating and scoring cannot stop half-way: on SIGTERM another worker starts it over, at once.
            scores = unless_drained(score, "an evaluation")
        status, values = JobStatus.SUCCEEDED, {"scores": scores}
    except Drained:
        return _hand_over(rt, evaluation_id)
    except Exception as exc:
        log.warning("evaluation %s failed", evaluation_id, exc_info=True)
        status = JobStatus.FAILED
        values = {"error_code": "evaluation_failed", "error_message": f"{exc.__class__.__name__}: {exc}"[:2000]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = int(state.get("prompts") or 0) * int(state.get("images_per_prompt") or 0)
    usage = Usage(time.perf_counter() - started, _device_name(rt), images=images, steps=images * int(state["steps"]))
    ended = _end(rt, claimed, status, usage, values)
    if ended is None:  # another worker holds it now and needs the photos
        log.warning("evaluation %s: lease lost", evaluation_id)
        return "lease_lost"
    _delete_references(rt, claimed.reference_keys)
    if not ended:
        return "lease_lost"  # the adapter was deleted meanwhile
    return status


def _hand_over(rt: Runtime, evaluation_id: str) -> str:
    """A drain during an evaluation: release the lease (the attempt not counted) and wake another worker."""
    if not release_lease(rt, Evaluation, evaluation_id):
        return "lease_lost"
    try:
        rt.send(EVALUATE_TASK, evaluation_id)
    except Exception:  # the reaper sends it again once the broker is back
        log.warning("evaluation %s: could not send the hand-over message; the reaper will", evaluation_id)
    log.warning("evaluation %s: lease released for another worker (draining)", evaluation_id)
    return "drained"


def _device_name(rt: Runtime) -> str:
    import torch  # lazy, as in score_adapter: this module starts without torch

    device = rt.settings.worker_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return device


def _end(rt: Runtime, claimed: _Claimed, status: str, usage: Usage, values: dict[str, Any]) -> bool | None:
    """Write the final status, the result and the usage record in one transaction, by the lease owner
    (workers/outcome.py): True; the row is gone (its adapter was deleted): False; another worker owns it: None."""
    evaluation_id = claimed.evaluation_id
    if end_job(rt, Evaluation, evaluation_id, kind="evaluation", tenant_id=claimed.tenant_id, status=status,
               usage=usage, webhook=False, reference_keys=[], **values):  # fmt: skip
        return True

    def gone() -> bool:
        with rt.sessions() as session:
            return session.get(Evaluation, evaluation_id) is None

    window = rt.settings.transient_retry_seconds
    return False if retry_transient(gone, what=f"evaluation {evaluation_id}: read", window_seconds=window) else None
