"""The broker side both the gateway and the workers agree on: queue names, task names, the Celery app.

The gateway only sends tasks by name (it never imports ``workers``, torch or diffusers); the workers
register the tasks under these names. The database row is the source of truth: a message is only a
wake-up call, so losing one costs latency (the reaper re-enqueues), never a job.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from shared.settings import Settings

__all__ = [
    "EVALUATE_TASK",
    "GENERATE_TASK",
    "INFER_QUEUE",
    "REAP_TASK",
    "TRAIN_QUEUE",
    "TRAIN_TASK",
    "WEBHOOK_QUEUE",
    "WEBHOOK_TASK",
    "celery_app",
    "make_celery",
    "send",
]

TRAIN_QUEUE = "train"
INFER_QUEUE = "infer"
# Deliveries wait on other people's servers: their own queue and worker pool, never a GPU worker's.
WEBHOOK_QUEUE = "webhooks"
TRAIN_TASK = "krona.train"
GENERATE_TASK = "krona.generate"
WEBHOOK_TASK = "krona.webhook"
REAP_TASK = "krona.reap"
# Scoring an adapter (POST /v1/adapters/{id}/evaluations): GPU work of the training workers' kind.
EVALUATE_TASK = "krona.evaluate"

TASK_ROUTES = {
    TRAIN_TASK: {"queue": TRAIN_QUEUE},
    GENERATE_TASK: {"queue": INFER_QUEUE},
    WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
    REAP_TASK: {"queue": INFER_QUEUE},
    EVALUATE_TASK: {"queue": TRAIN_QUEUE},
}


def make_celery(settings: Settings) -> Celery:
    """The Celery app with the service's reliability policy, set here once for every task.

    Acknowledged late and rejected (re-queued) when the worker dies mid-task, one message prefetched at a
    time: a job's message is never lost with a crashed worker, and a long job holds no others back.
    """
    # lazy: loads celery, kombu, yaml
    from celery import Celery

    broker = settings.resolved_broker_url
    app = Celery("krona", broker=broker)
    transport_options = {}
    if broker.startswith(("redis://", "rediss://")):
        # Longer than the longest job, or Redis hands a running task to a second worker.
        transport_options = {"visibility_timeout": settings.visibility_timeout_seconds}
    app.conf.update(
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def send(app: Celery, task: str, job_id: str, *, countdown: float | None = None, producer: Any = None) -> None:
    """Send ``task`` for ``job_id`` by name to its queue (the gateway and the workers both send this way).

    ``countdown`` delays delivery by that many seconds; ``producer`` reuses one connection for a batch.
    """
    app.send_task(task, args=[job_id], queue=TASK_ROUTES[task]["queue"], countdown=countdown, producer=producer)


@lru_cache
def celery_app() -> Celery:
    # lazy: loads pydantic
    from shared.settings import get_settings

    return make_celery(get_settings())
