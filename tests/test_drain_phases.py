"""Drain in every long phase (issue 22, item 4): SIGTERM during the class images, the model load or an evaluation
hands the job over at once (the lease released, the attempt not counted, a wake-up sent), and the class images
made so far stay in storage, so the next worker does not make them again. The phases are written to the row for
progress displays. Each test runs a claimed job in this process (the drain flag is process-wide) on the session's
PostgreSQL with local storage."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers.api import image_files
from sqlalchemy import select

from shared.db import Evaluation, Training


@pytest.fixture
def drain_flag():
    from workers.drain import reset_drain

    reset_drain()
    yield
    reset_drain()


def _runtime(api, owner: str):
    from workers.runtime import Runtime

    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=api.context.storage, owner=owner)
    rt.sent = []
    rt.send = lambda task, job_id, **_: rt.sent.append((task, job_id))
    return rt


def _training(api, **params) -> str:
    data = {"instance_prompt": "a photo of sks dog", "params": json.dumps({"gradient_accumulation": 1, **params})}
    answer = api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def _claim(rt, model, job_id: str) -> None:
    from workers.lease import claim

    with rt.sessions() as session:
        assert claim(session, model, job_id, rt.owner, 600)


def _row(api, model, job_id: str):
    with api.context.sessions() as session:
        row = session.get(model, job_id)
        session.expunge(row)
        return row


def _wait(condition, what: str, timeout: float = 600.0):
    """Poll on progress with a generous bound (a loaded CI machine): never a budget for an idle one."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _run_in_thread(call) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_sigterm_during_class_images_hands_over_and_keeps_the_images_made(api, drain_flag, monkeypatch, tiny_folders):
    import workers.training.class_images as class_images
    from workers.drain import request_drain, reset_drain
    from workers.training.job import run_claimed_training

    count = 6
    training_id = _training(
        api,
        steps=2,
        prior_preservation=True,
        class_prompt="a photo of a dog",
        num_class_images=count,
        resolution=64,
    )
    first = _runtime(api, "first")
    _claim(first, Training, training_id)
    tenant_id = _row(api, Training, training_id).tenant_id
    prefix = f"tenants/{tenant_id}/class-images/"

    def cached() -> list[str]:
        return sorted(key for key, _ in api.context.storage.list_with_times(prefix))

    original = class_images.generate_class_images
    drained, generated = threading.Event(), []

    def counting(components, spec, *, cache=None, should_stop=None):
        """Counts the images made; in the first run, holds after the second until SIGTERM has come (progress,
        not a race against the machine's speed)."""

        class Counting:
            def get(self, index):
                return cache.get(index)

            def put(self, index, png):
                generated.append(index)
                cache.put(index, png)
                if len(generated) == 2 and not drained.is_set():
                    assert drained.wait(600), "the test never requested the drain"

        return original(components, spec, cache=Counting(), should_stop=should_stop)

    monkeypatch.setattr("workers.training.trainer.generate_class_images", counting)
    thread, result = _run_in_thread(lambda: run_claimed_training(first, training_id))
    _wait(lambda: len(cached()) >= 2, "two class images stored")
    assert _row(api, Training, training_id).phase == "class_images"
    stopped = time.monotonic()
    request_drain("test")
    drained.set()
    thread.join(timeout=600)
    assert result == ["drained"]
    handed_over = time.monotonic() - stopped
    row = _row(api, Training, training_id)
    assert row.status == "running" and row.lease_owner is None and row.attempts == 0
    assert ("krona.train", training_id) in first.sent
    made = cached()
    assert len(made) == 2 and generated == [0, 1]
    times = dict(api.context.storage.list_with_times(prefix))
    # The bound: the image in flight is done (it cannot be cut), then the hand-over; 30 s is the bound.
    assert handed_over < 30, handed_over

    reset_drain()
    generated.clear()
    second = _runtime(api, "second")
    _claim(second, Training, training_id)
    assert run_claimed_training(second, training_id) == "succeeded"
    assert sorted(generated) == list(range(len(made), count))  # only the missing ones
    assert all(dict(api.context.storage.list_with_times(prefix))[key] == times[key] for key in made)  # not rewritten
    assert _row(api, Training, training_id).phase == "uploading"


def test_sigterm_while_the_model_loads_hands_over_at_once(api, drain_flag, monkeypatch):
    import workers.training.job as job
    from workers.drain import request_drain
    from workers.training.job import run_claimed_training

    training_id = _training(api, steps=2)
    rt = _runtime(api, "loader")
    _claim(rt, Training, training_id)
    loading, never = threading.Event(), threading.Event()

    def slow_load(*_args, **_kwargs):  # a download that would take minutes
        loading.set()
        never.wait(300)
        raise RuntimeError("not reached in the test")

    monkeypatch.setattr(job, "_components", slow_load)
    thread, result = _run_in_thread(lambda: run_claimed_training(rt, training_id))
    assert loading.wait(120)
    assert _row(api, Training, training_id).phase == "loading_model"
    stopped = time.monotonic()
    request_drain("test")
    thread.join(timeout=120)
    never.set()
    assert result == ["drained"] and time.monotonic() - stopped < 30
    row = _row(api, Training, training_id)
    assert row.status == "running" and row.lease_owner is None and row.attempts == 0
    assert ("krona.train", training_id) in rt.sent


def test_sigterm_during_an_evaluation_hands_it_over(api, drain_flag, monkeypatch):
    import workers.evaluation
    from shared.db import Adapter, new_id
    from shared.tenants import tenant_for_key
    from workers.drain import request_drain
    from workers.evaluation import run_claimed_evaluation

    with api.context.sessions() as session:
        tenant = tenant_for_key(session, api.keys["acme"])
        adapter_id, evaluation_id = new_id("adp"), new_id("evl")
        session.add(Adapter(id=adapter_id, tenant_id=tenant.id, base_model="tiny-sd", config={}, num_parameters=1,
                            size_bytes=1, sha256="0" * 64, storage_key=f"{adapter_id}.safetensors"))  # fmt: skip
        session.flush()
        params = {"prompts": 1, "images_per_prompt": 1, "steps": 2, "class_noun": "dog", "identifier": "sks",
                  "models": {"clip": "tiny-clip", "dino": "tiny-dino"}, "reference_images": 0}  # fmt: skip
        session.add(Evaluation(id=evaluation_id, tenant_id=tenant.id, adapter_id=adapter_id, base_model="tiny-sd",
                               params=params, reference_keys=[]))  # fmt: skip
        session.commit()
    api.context.storage.put_bytes(f"{adapter_id}.safetensors", b"adapter")
    rt = _runtime(api, "scorer")
    _claim(rt, Evaluation, evaluation_id)
    scoring, never = threading.Event(), threading.Event()

    def slow_score(**_):
        scoring.set()
        never.wait(300)
        return {"clip_i": 0.0, "clip_t": 0.0, "dino": 0.0}

    monkeypatch.setattr(workers.evaluation, "score_adapter", slow_score)
    thread, result = _run_in_thread(lambda: run_claimed_evaluation(rt, evaluation_id))
    assert scoring.wait(120)
    stopped = time.monotonic()
    request_drain("test")
    thread.join(timeout=120)
    never.set()
    assert result == ["drained"] and time.monotonic() - stopped < 30
    row = _row(api, Evaluation, evaluation_id)
    assert row.status == "running" and row.lease_owner is None and row.attempts == 0
    assert ("krona.evaluate", evaluation_id) in rt.sent


def test_a_training_writes_its_phases(api, tiny_folders, monkeypatch):
    """loading_model, training, uploading in that order (class_images and evaluating only when asked for)."""
    from workers.training.job import _Attempt, run_claimed_training

    training_id = _training(api, steps=2)
    rt = _runtime(api, "phases")
    _claim(rt, Training, training_id)
    seen: list[str] = []
    original = _Attempt.set_phase

    def record(self, phase):
        seen.append(phase)
        original(self, phase)

    monkeypatch.setattr(_Attempt, "set_phase", record)
    assert run_claimed_training(rt, training_id) == "succeeded"
    assert seen == ["loading_model", "training", "uploading"]
    body = api.client.get(f"/v1/trainings/{training_id}", headers=api.headers()).json()
    assert body["progress"]["phase"] is None and body["queue_position"] is None  # ended
    with api.context.sessions() as session:
        assert session.scalar(select(Training.phase).where(Training.id == training_id)) == "uploading"


def test_queued_jobs_show_their_phase_and_place(api):
    first, second = _training(api, steps=2), _training(api, steps=2)
    bodies = [api.client.get(f"/v1/trainings/{t}", headers=api.headers()).json() for t in (first, second)]
    assert [b["progress"]["phase"] for b in bodies] == ["queued", "queued"]
    assert bodies[1]["queue_position"] == bodies[0]["queue_position"] + 1
    listed = api.client.get("/v1/trainings", headers=api.headers(), params={"status": "queued"}).json()["data"]
    positions = {b["id"]: b["queue_position"] for b in listed}
    assert positions[second] == positions[first] + 1
    generation = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "p"}).json()
    assert generation["phase"] == "queued"
