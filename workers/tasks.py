"""Celery tasks: thin. Each takes an id, and calls the domain code with the process's runtime.

The delivery policy (late acknowledgement, re-queue when the worker dies, prefetch of one) is the app's,
set once in ``shared/queue.py``; no task needs another. Retries are not Celery's either: the row says
what is due, and the reaper re-sends it (see ``workers/webhooks.py`` for the webhook's schedule).

Start a worker with ``celery -A workers.tasks worker -Q train,infer --pool solo -c 1`` (``krona worker``
does, and ``krona up`` starts one), and a webhook worker with ``-Q webhooks --pool threads -c 8``
(``krona worker --queues webhooks``). The reaper runs in a thread of every worker.

Lifecycle: a worker whose start-up check fails (the database schema, the settings) exits with status 1
instead of running without its reaper; SIGTERM drains (workers/drain.py): a training checkpoints and hands
over, a batch finishes, and a message that arrives meanwhile goes back to its queue. While the worker runs, a
thread touches ``ALIVE_FILE`` every ``ALIVE_INTERVAL_SECONDS``: the container's liveness probe reads its age,
which a worker busy with one long job (the solo pool answers no broadcast) still keeps fresh.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from shared.queue import EVALUATE_TASK, GENERATE_TASK, REAP_TASK, TRAIN_TASK, WEBHOOK_TASK, celery_app

log = logging.getLogger("krona.worker")

app = celery_app()

# The liveness file: touched by a thread while the worker runs (deploy/k8s probes and the image's HEALTHCHECK).
ALIVE_FILE = Path(tempfile.gettempdir()) / "krona-worker.alive"
ALIVE_INTERVAL_SECONDS = 10


def _unless_draining(job_id: str) -> None:
    """A message taken after SIGTERM goes back to its queue unclaimed, for a worker that stays."""
    # lazy: loads sqlalchemy
    from workers.drain import drain_requested

    if drain_requested():
        raise Reject(f"draining; {job_id} goes back to the queue", requeue=True)


@app.task(name=TRAIN_TASK)
def train_task(training_id: str) -> str:
    # lazy: loads torch, sqlalchemy, numpy, …
    from workers.runtime import runtime
    from workers.training.job import run_training_job

    _unless_draining(training_id)
    return run_training_job(runtime(), training_id)


@app.task(name=GENERATE_TASK)
def generate_task(generation_id: str) -> str:
    # lazy: loads sqlalchemy, numpy, prometheus_client
    from workers.inference.job import run_generation_job
    from workers.runtime import runtime

    _unless_draining(generation_id)
    return run_generation_job(runtime(), generation_id)


@app.task(name=EVALUATE_TASK)
def evaluate_task(job_id: str) -> str:
    # lazy: loads sqlalchemy, numpy, prometheus_client
    from workers.evaluation import run_evaluation_job
    from workers.runtime import runtime

    # Like krona.train: a wake-up for the train queue's fairest job (workers/train_queue.py).
    _unless_draining(job_id)
    return run_evaluation_job(runtime(), job_id)


@app.task(name=WEBHOOK_TASK)
def webhook_task(ref: str) -> str:
    # One attempt; the schedule of the next one is kept on the job's row (workers/webhooks.py), not in Celery.
    from workers.runtime import runtime
    from workers.webhooks import deliver_webhook

    return deliver_webhook(runtime(), ref)


@app.task(name=REAP_TASK)
def reap_task() -> dict:
    # lazy: loads sqlalchemy
    from workers.reaper import reap_once
    from workers.runtime import runtime

    return reap_once(runtime())


_stop = threading.Event()


def _reaper_loop() -> None:
    # lazy: loads sqlalchemy
    from workers.reaper import reap_once
    from workers.runtime import runtime
    from workers.transient import fault_code

    rt = runtime()
    outage: str | None = None  # one line when a dependency outage starts and one when it ends
    while not _stop.wait(rt.settings.reaper_interval_seconds):
        try:
            reap_once(rt)
        except Exception as exc:
            code = fault_code(exc)
            if code is None:
                log.exception("reaper pass failed")
            elif outage is None:
                outage = code
                log.warning("reaper: %s (%s); retrying every %s s", code, exc.__class__.__name__,
                            rt.settings.reaper_interval_seconds)  # fmt: skip
            continue
        if outage is not None:
            log.warning("reaper: %s is over", outage)
            outage = None


def _alive_loop() -> None:
    while True:
        try:
            ALIVE_FILE.touch()
        except OSError:  # a full or read-only /tmp: the probe fails, which is the right answer
            log.warning("cannot touch %s", ALIVE_FILE, exc_info=True)
        if _stop.wait(ALIVE_INTERVAL_SECONDS):
            return


@worker_ready.connect
def _start(**_kwargs) -> None:
    # lazy: loads sqlalchemy
    from workers.runtime import runtime

    try:
        rt = runtime()  # the settings, the database and its schema (shared/db/session.py check_migrated)
    except Exception as exc:
        # Celery logs and ignores a signal handler's exception, which would leave a worker running with no
        # reaper on a database it cannot use: exit instead, so that the container (or `krona up`) restarts it.
        log.critical("worker cannot start: %s: %s", exc.__class__.__name__, exc)
        raise SystemExit(1) from exc  # not an Exception: Celery lets it end the worker (status 1)
    threading.Thread(target=_reaper_loop, name="krona-reaper", daemon=True).start()
    threading.Thread(target=_alive_loop, name="krona-alive", daemon=True).start()
    if rt.settings.worker_metrics_port:
        # lazy: loads prometheus_client
        from workers.metrics import start_metrics_server

        start_metrics_server(rt.settings.worker_metrics_port)


@worker_shutting_down.connect
def _drain(sig: str = "SIGTERM", how: str = "Warm", **_kwargs) -> None:
    # Sent from Celery's signal handler (SIGTERM, SIGINT) in the main process, before the warm shutdown waits
    # for the running task: the task sees the flag at its next step (workers/drain.py).
    from workers.drain import request_drain

    request_drain(f"{sig}, {how.lower()} shutdown")


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _stop.set()
