"""Graceful drain: what a worker does between SIGTERM and its exit.

SIGTERM comes from a Kubernetes scale-down, eviction or rollout, `docker stop`, or `krona up` stopping.
Celery's warm shutdown lets the running task finish and then takes no new message; on its own that would keep
a training running until the grace period ends and SIGKILL loses everything since the last checkpoint. So the
``worker_shutting_down`` signal (sent from Celery's SIGTERM/SIGINT handler) sets a process-wide flag here, and:

- a training stops at its next step: the trainer writes a checkpoint (the cancel path of ``train``), the job
  stores it, releases its lease (the row stays ``running`` with an expired lease and no owner, the attempt is
  not counted) and sends the wake-up message, so that another worker resumes from that step at once instead of
  waiting ``KRONA_LEASE_SECONDS`` for the lease to expire; then the task returns and the worker exits;
- a generation batch in progress finishes (its images are stored and its rows succeed once); a message that
  arrives after the flag is set is put back on its queue unclaimed (``Reject(requeue=True)``);
- a task that has not claimed its job yet puts its message back the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import update

from shared.db import JobStatus, Training, utcnow
from shared.queue import TRAIN_TASK

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "Drained",
    "drain_requested",
    "hand_over_training",
    "release_lease",
    "request_drain",
    "reset_drain",
    "unless_drained",
]

log = logging.getLogger("krona.worker.drain")
T = TypeVar("T")

_requested = threading.Event()


def request_drain(reason: str = "SIGTERM") -> None:
    """Ask the running job to stop at its next safe point (the worker is shutting down)."""
    if not _requested.is_set():
        log.warning(
            "draining (%s): no new job is taken; a running training checkpoints and hands over, running generations "
            "finish",
            reason,
        )
    _requested.set()


def drain_requested() -> bool:
    return _requested.is_set()


class Drained(Exception):
    """A long call was left running because the worker is draining (``unless_drained``)."""


def unless_drained(call: Callable[[], T], what: str, poll_seconds: float = 0.5) -> T:
    """``call()``, run in a thread while this one watches the drain flag: its result, or Drained as soon as a
    drain is requested while it still runs. For the phases that cannot stop half-way (loading or downloading
    the model, an evaluation's generate-and-score): the job hands over at once, and the call is left to finish
    in the background of a process that is about to exit."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"krona-{what}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_seconds)
        if thread.is_alive() and drain_requested():
            log.warning("draining: %s left running, the job hands over", what)
            raise Drained(what)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def reset_drain() -> None:
    """Clear the flag (tests; a process never un-drains)."""
    _requested.clear()


def release_lease(rt: Runtime, model, job_id: str) -> bool:
    """Give up this worker's lease on a running job so that any worker may claim it now: the row stays
    ``running`` with no owner and an expired lease (what a crashed worker leaves, minus the wait), and the claim
    this attempt made is not counted against ``MAX_ATTEMPTS`` (a drain is not a failure). False if the job was
    not this worker's any more."""
    now = utcnow()
    with rt.sessions() as session:
        result = session.execute(
            update(model)
            .where(model.id == job_id, model.status == JobStatus.RUNNING, model.lease_owner == rt.owner)
            .values(
                lease_owner=None,
                lease_expires_at=now - timedelta(seconds=rt.settings.lease_seconds),
                attempts=model.attempts - 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return result.rowcount == 1


def hand_over_training(
    rt: Runtime, training_id: str, checkpoint: Path | None, store_checkpoint: Callable[[Path], None]
) -> str:
    """After ``train`` stopped for a drain with ``checkpoint`` written locally: store it (``store_checkpoint``
    also records its key on the row), release the lease and send the wake-up message. Returns 'drained'."""
    if checkpoint is not None:
        store_checkpoint(checkpoint)
    if not release_lease(rt, Training, training_id):
        log.warning("training %s: the lease was no longer ours; nothing to hand over", training_id)
        return "lease_lost"
    try:
        rt.send(TRAIN_TASK, training_id)
    except Exception:  # the broker is down: the reaper of any worker re-sends the expired lease
        log.warning("training %s: could not send the hand-over message; the reaper will", training_id, exc_info=True)
    log.warning("training %s: checkpoint %s stored and lease released for another worker", training_id,
                checkpoint.name if checkpoint else None)  # fmt: skip
    return "drained"
