"""Celery tasks: thin. Each takes an id, and calls the domain code with the process's runtime.

The delivery policy (late acknowledgement, re-queue when the worker dies, prefetch of one) is the app's,
set once in ``shared/queue.py``; no task needs another. Retries are not Celery's either: the row says
what is due, and the reaper re-sends it (see ``workers/webhooks.py`` for the webhook's schedule).

Start a worker with ``celery -A workers.tasks worker -Q train,infer --pool solo -c 1`` (``krona worker``
does, and ``krona up`` starts one), and a webhook worker with ``-Q webhooks --pool threads -c 8``
(``krona worker --queues webhooks``). The reaper runs in a thread of every worker.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from shared.queue import GENERATE_TASK, REAP_TASK, TRAIN_TASK, WEBHOOK_TASK, celery_app

log = logging.getLogger("krona.worker")

app = celery_app()


@app.task(name=TRAIN_TASK)
def train_task(training_id: str) -> str:
    from workers.runtime import runtime
    from workers.training.job import run_training_job

    return run_training_job(runtime(), training_id)


@app.task(name=GENERATE_TASK)
def generate_task(generation_id: str) -> str:
    from workers.inference.job import run_generation_job
    from workers.runtime import runtime

    return run_generation_job(runtime(), generation_id)


@app.task(name=WEBHOOK_TASK)
def webhook_task(ref: str) -> str:
    # One attempt; the schedule of the next one is kept on the job's row (workers/webhooks.py), not in Celery.
    from workers.runtime import runtime
    from workers.webhooks import deliver_webhook

    return deliver_webhook(runtime(), ref)


@app.task(name=REAP_TASK)
def reap_task() -> dict:
    from workers.reaper import reap_once
    from workers.runtime import runtime

    return reap_once(runtime())


_stop = threading.Event()


def _reaper_loop() -> None:
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


@worker_ready.connect
def _start(**_kwargs) -> None:
    from workers.runtime import runtime

    rt = runtime()  # fails fast on an unmigrated database
    threading.Thread(target=_reaper_loop, name="krona-reaper", daemon=True).start()
    if rt.settings.worker_metrics_port:
        from workers.metrics import start_metrics_server

        start_metrics_server(rt.settings.worker_metrics_port)


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _stop.set()
