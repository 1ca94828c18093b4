"""Scoring an adapter in the service: CLIP-I, CLIP-T and DINO (shared/eval) stored in ``adapters.evaluation``.

Two ways in:
- ``params.evaluate`` on a training: ``evaluate_trained_adapter`` runs in the training job, after ``train`` and
  before the adapter row is written and the subject's photos are purged (workers/retention.py), so the photos
  are the reference images; the training succeeds with its adapter already scored. A failed evaluation does
  not fail the training: the adapter gets ``evaluation.status = "failed"`` with the error.
- ``POST /v1/adapters/{id}/evaluations`` (uploaded reference images): the gateway stores the images and the
  request in ``adapters.evaluation`` (status queued) and sends ``EVALUATE_TASK``; ``run_evaluation_job``
  takes it. The lease lives in the same JSON (owner and expiry, taken under a row lock): a repeated message is
  skipped while the lease holds, and a message after a crash takes over once it expired. The
  reaper (workers/reaper.py) sends an evaluation again when it stayed queued for the enqueue grace since it
  was last sent, or when its lease expired (a crashed worker); the gateway also accepts a new request over a
  queued one, or over a running one whose lease expired.

The images are generated with the base model loaded by ``shared.eval.run`` (freed before the scoring models
load); models come from ``KRONA_EVAL_CLIP_MODEL`` / ``KRONA_EVAL_DINO_MODEL``. The identifier and class noun
are client text: they fill the trusted DreamBooth templates once, literally (shared/eval/prompts.py), and the
reference images are decoded with the upload limits (shared/images.py).

The uploaded reference images are deleted by whoever ends the request, on every path: the worker that
finishes it (succeeded or failed), the one that gives up on it (attempts used up), the one that finds it
ended but still listing images, the one whose adapter was deleted meanwhile, and the one whose lease was taken
over for the images the new holder no longer lists. A worker that lost its lease to one still running the same
request leaves the images to it. (The storage sweep, workers/retention.py, is the net under a crash.)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from shared.db import Adapter, utcnow
from shared.images import ImageLimits
from shared.settings import Settings
from shared.training_spec import EvaluationRequest

from .lease import MAX_ATTEMPTS, worker_identity
from .runtime import Runtime

log = logging.getLogger("krona.worker.evaluation")

__all__ = ["evaluate_trained_adapter", "run_evaluation_job", "score_adapter"]

# One evaluation holds its lease this long (no heartbeat): the few prompts' generations and scoring of a
# service evaluation take minutes at most on a GPU.
EVALUATION_LEASE_SECONDS = 3600


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
    from shared.eval.prompts import prompt_templates
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
    from shared.eval.prompts import check_subject_word

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
    return {**state, **scores, "status": "succeeded", "error": None, "finished_at": utcnow().isoformat()}


def _failed(state: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    error = {"code": code, "message": message[:2000]}
    return {**state, "status": "failed", "error": error, "finished_at": utcnow().isoformat()}


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
        status="running",
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


_LEASE_FIELDS = ("lease_owner", "lease_expires_at", "reference_keys")


def _ended(state: dict[str, Any]) -> dict[str, Any]:
    """The state as it stays once the evaluation ended: no lease, no reference images."""
    return {k: v for k, v in state.items() if k not in _LEASE_FIELDS}


def _claim(rt: Runtime, adapter_id: str, owner: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Take the adapter's queued evaluation (or a running one whose lease expired).

    Returns (its state, or None when it is not ours to run; the reference images nobody will use any more, to
    delete: those of a request given up here after its last attempt, or of one found ended)."""
    from sqlalchemy import select

    with rt.sessions() as session:
        row = session.scalars(select(Adapter).where(Adapter.id == adapter_id).with_for_update()).first()
        state = dict(row.evaluation or {}) if row is not None else {}
        keys = list(state.get("reference_keys") or [])
        now = utcnow()
        expired = state.get("status") == "running" and state.get("lease_expires_at", "") < now.isoformat()
        if state.get("status") in ("succeeded", "failed") and keys:  # ended, but its images stayed listed
            row.evaluation = _ended(state)
            session.commit()
            return None, keys
        if state.get("status") != "queued" and not expired:  # gone, ended, or running under a live lease
            return None, []
        if state.get("attempts", 0) >= MAX_ATTEMPTS:
            row.evaluation = _ended(_failed(state, "evaluation_failed", f"gave up after {MAX_ATTEMPTS} attempts"))
            session.commit()
            return None, keys
        state.update(
            status="running",
            lease_owner=owner,
            lease_expires_at=(now + timedelta(seconds=EVALUATION_LEASE_SECONDS)).isoformat(),
            attempts=state.get("attempts", 0) + 1,
        )
        row.evaluation = state  # a new dict: the JSON column sees the change
        session.commit()
        return {**state, "base_model": row.base_model, "storage_key": row.storage_key}, []


def _finish(rt: Runtime, adapter_id: str, owner: str, state: dict[str, Any]) -> tuple[bool, list[str]]:
    """Write the final state if this worker still holds the lease.

    Returns (whether it did; the reference images of ``state`` to delete now: all of them when it did or when the
    adapter is gone, else those that the evaluation's current state does not list: a worker that took the
    lease over still needs the ones it lists)."""
    from sqlalchemy import select

    keys = list(state.get("reference_keys") or [])
    with rt.sessions() as session:
        row = session.scalars(select(Adapter).where(Adapter.id == adapter_id).with_for_update()).first()
        if row is None:
            session.rollback()
            return False, keys
        current = row.evaluation or {}
        if current.get("lease_owner") != owner:
            session.rollback()
            still_listed = set(current.get("reference_keys") or [])
            return False, [key for key in keys if key not in still_listed]
        row.evaluation = _ended(state)
        session.commit()
        return True, keys


def _delete_references(rt: Runtime, keys: list[str]) -> None:
    for key in keys:
        try:
            rt.storage.delete(key)
        except Exception:  # the storage sweep (workers/retention.py) takes what is left
            log.warning("could not delete evaluation image %s", key, exc_info=True)


def run_evaluation_job(rt: Runtime, adapter_id: str) -> str:
    """Run adapter ``adapter_id``'s requested evaluation; the final status, 'skipped' if not ours to run, or
    'lease_lost' if another worker took it over (or the adapter was deleted) meanwhile.

    The reference images (uploaded with the request) are deleted from storage when it ends, on every path (the
    module's docstring lists them); a worker still running the request keeps them.
    """
    owner = worker_identity()
    claimed, orphaned = _claim(rt, adapter_id, owner)
    _delete_references(rt, orphaned)
    if claimed is None:
        log.info("no evaluation to run for adapter %s", adapter_id)
        return "skipped"
    base_model, storage_key = claimed.pop("base_model"), claimed.pop("storage_key")
    reference_keys = list(claimed.get("reference_keys", []))
    work = Path(tempfile.mkdtemp(prefix=f"krona-eval-{adapter_id}-"))
    try:
        _subject_words(claimed)
        adapter_path = work / "adapter.safetensors"
        adapter_path.write_bytes(rt.storage.get_bytes(storage_key))
        references = _write_references(
            work / "references", [(key, rt.storage.get_bytes(key)) for key in reference_keys]
        )
        scores = score_adapter(
            base_model=base_model,
            adapter_path=adapter_path,
            reference_dir=references,
            state=claimed,
            device=rt.settings.worker_device,
            work=work,
            image_limits=_image_limits(rt.settings),
        )
        final = _scored(claimed, scores)
    except Exception as exc:
        log.warning("evaluation of adapter %s failed", adapter_id, exc_info=True)
        final = _failed(claimed, "evaluation_failed", f"{exc.__class__.__name__}: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finished, orphaned = _finish(rt, adapter_id, owner, final)
    _delete_references(rt, orphaned)
    if not finished:
        log.warning("adapter %s: evaluation lease lost (or the adapter was deleted)", adapter_id)
        return "lease_lost"
    return final["status"]
