"""The train queue's one entry: trainings and adapter evaluations are taken in one fair order.

Both ``krona.train`` and ``krona.evaluate`` messages only wake a train worker. It claims the train queue's
fairest job (shared/scheduler.py: the tenant with the least weighted service among those with queued trainings
or evaluations, then that tenant's oldest job of either kind; a crashed job named by the message first) and runs
it. So a tenant that queues a hundred evaluations is charged for them like trainings, and another tenant's
training does not wait behind them in message order.
"""

from __future__ import annotations

import logging

from shared.db import Evaluation, Training
from shared.scheduler import MODELS_OF_QUEUE

from .evaluation import run_claimed_evaluation
from .lease import claim_next_job
from .runtime import Runtime

log = logging.getLogger("krona.worker")

__all__ = ["run_train_queue_job"]


def run_train_queue_job(rt: Runtime, message_job_id: str) -> str:
    """Claim the train queue's next job and run it; its final status, or 'skipped' when nothing was claimable."""
    settings = rt.settings
    with rt.sessions() as session:
        claimed = claim_next_job(
            session, MODELS_OF_QUEUE["train"], settings, rt.owner, settings.lease_seconds, message_job_id=message_job_id
        )
    if claimed is None:
        log.info("no training or evaluation to claim (message for %s)", message_job_id)
        return "skipped"
    model, job_id = claimed
    if model is Evaluation:
        return run_claimed_evaluation(rt, job_id)
    assert model is Training
    # Lazy: the training job loads torch and diffusers (seconds), which a claim that finds an evaluation, or
    # nothing, does not need.
    from workers.training.job import run_claimed_training

    return run_claimed_training(rt, job_id)
