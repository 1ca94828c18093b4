"""The Celery policy, set once on the app, and the one send helper the gateway and the workers share."""

from datetime import UTC, datetime, timedelta

import pytest

from shared.queue import GENERATE_TASK, REAP_TASK, TRAIN_TASK, WEBHOOK_TASK, make_celery
from shared.settings import Settings

QUEUES = ("train", "infer", "webhooks")


def _drain(app, queue: str) -> list:
    """Every message waiting in ``queue`` (kombu's memory transport is shared by the whole process)."""
    messages = []
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue, no_ack=True)
        try:
            while True:
                try:
                    messages.append(simple.get_nowait())
                except simple.Empty:
                    return messages
        finally:
            simple.close()


@pytest.fixture
def memory_app():
    app = make_celery(Settings(broker_url="memory://"))
    for queue in QUEUES:
        _drain(app, queue)
    return app


def test_every_task_takes_the_apps_delivery_policy():
    from workers.tasks import app

    for name in (TRAIN_TASK, GENERATE_TASK, WEBHOOK_TASK, REAP_TASK):
        task = app.tasks[name]
        assert task.acks_late is True, name
        assert task.reject_on_worker_lost is True, name
    assert app.conf.worker_prefetch_multiplier == 1


def test_gateway_and_workers_send_through_the_same_helper(memory_app, monkeypatch):
    import shared.queue
    from services.gateway.context import CeleryEnqueuer
    from workers.runtime import Runtime

    enqueuer = CeleryEnqueuer(Settings(broker_url="memory://"))
    enqueuer.send(TRAIN_TASK, "t1")
    assert enqueuer.send_many(GENERATE_TASK, ["g1", "g2"]) == 2
    monkeypatch.setattr(shared.queue, "celery_app", lambda: memory_app)
    runtime = Runtime(settings=Settings(broker_url="memory://"), sessions=None, storage=None, owner="test")
    before = datetime.now(UTC)
    runtime.send(WEBHOOK_TASK, "training:t1", countdown=60)
    after = datetime.now(UTC)

    received = {queue: _drain(memory_app, queue) for queue in QUEUES}
    assert [(m.headers["task"], m.payload[0]) for m in received["train"]] == [(TRAIN_TASK, ["t1"])]
    assert [(m.headers["task"], m.payload[0]) for m in received["infer"]] == [
        (GENERATE_TASK, ["g1"]),
        (GENERATE_TASK, ["g2"]),
    ]
    (webhook,) = received["webhooks"]
    assert (webhook.headers["task"], webhook.payload[0]) == (WEBHOOK_TASK, ["training:t1"])
    eta = datetime.fromisoformat(webhook.headers["eta"])
    assert before + timedelta(seconds=60) <= eta <= after + timedelta(seconds=60)  # the countdown travels along
    for messages in received.values():
        assert all(m.headers["eta"] is None for m in messages if m.headers["task"] != WEBHOOK_TASK)
