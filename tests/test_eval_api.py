"""Adapter evaluation in the service: `params.evaluate` on a training and `POST /v1/adapters/{id}/evaluations`,
on the embedded stack (`krona up`) with tiny-sd and the tiny CLIP/DINO models (their scores mean nothing)."""

from __future__ import annotations

import json
import time

import pytest
from helpers.api import image_files, png

from shared.training_spec import EvaluationRequest, TrainingSpec

METRICS = ("clip_i", "clip_t", "dino")


def test_evaluate_param_is_checked_and_reads_the_subject_off_the_instance_prompt():
    assert TrainingSpec(instance_prompt="a photo of sks dog").evaluation() is None
    assert TrainingSpec(instance_prompt="a photo of sks dog", evaluate=True).evaluation() == EvaluationRequest()
    spec = TrainingSpec(instance_prompt="a photo of sks dog", evaluate={"prompts": 2, "per_prompt": 1})
    assert spec.evaluation() == EvaluationRequest(prompts=2, per_prompt=1)
    assert spec.evaluation().subject_words(spec.instance_prompt) == ("sks", "dog")
    assert EvaluationRequest(class_noun="cat").subject_words("a photo of zwx cat on a sofa") == ("zwx", "cat")
    for bad in ({"prompts": 0}, {"per_prompt": 5}, {"steps": 1000}, {"nonesuch": 1}, "yes", {"class_noun": ""}):
        with pytest.raises(ValueError, match="evaluate"):
            TrainingSpec(instance_prompt="a photo of sks dog", evaluate=bad)


def _wait(client, path, headers, done, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path, headers=headers).json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def test_a_training_with_evaluate_and_the_evaluation_route_score_the_adapter(tiny_folders, tmp_path):
    import httpx
    from helpers.services import KronaUp

    up = KronaUp(tmp_path, KRONA_EVAL_CLIP_MODEL="tiny-clip", KRONA_EVAL_DINO_MODEL="tiny-dino")
    try:
        up.wait(up.ready, "krona up ready", 120)
        headers = {"Authorization": f"Bearer {up.api_key()}"}
        with httpx.Client(base_url=up.base, timeout=30) as client:
            params = {"steps": 2, "gradient_accumulation": 1, "evaluate": {"prompts": 2, "per_prompt": 1, "steps": 2}}
            created = client.post(
                "/v1/trainings",
                headers=headers,
                files=image_files(2),
                data={"instance_prompt": "a photo of sks dog", "params": json.dumps(params)},
            )
            assert created.status_code == 202, created.text
            ended = lambda body: body["status"] not in ("queued", "running")  # noqa: E731
            training = _wait(client, f"/v1/trainings/{created.json()['id']}", headers, ended)
            assert training["status"] == "succeeded", (training, up.log()[-3000:])
            adapter_id = training["adapter_id"]
            adapter = client.get(f"/v1/adapters/{adapter_id}", headers=headers).json()
            evaluation = adapter["evaluation"]
            assert evaluation["status"] == "succeeded", evaluation
            assert all(-1 <= evaluation[m] <= 1 for m in METRICS), evaluation
            assert (evaluation["prompts"], evaluation["images_per_prompt"], evaluation["steps"]) == (2, 1, 2)
            assert (evaluation["class_noun"], evaluation["identifier"], evaluation["reference_images"]) == (
                "dog",
                "sks",
                2,
            )
            assert evaluation["models"] == {"clip": "tiny-clip", "dino": "tiny-dino"}
            assert "reference_keys" not in evaluation and "lease_owner" not in evaluation

            # Scoring the same adapter again, against uploaded photos (the training's are deleted by now).
            path = f"/v1/adapters/{adapter_id}/evaluations"
            files = [("images", ("ref.png", png(7), "image/png"))]
            bad = client.post(path, headers=headers, files=files, data={"params": '{"per_prompt": 9}'})
            assert bad.status_code == 422 and "per_prompt" in bad.text, bad.text
            missing = client.post("/v1/adapters/adp_000000000000000000000000/evaluations", headers=headers, files=files)
            assert missing.status_code == 404, missing.text
            queued = client.post(path, headers=headers, files=files, data={"params": '{"prompts": 1, "steps": 1}'})
            assert queued.status_code == 202, queued.text
            assert queued.json()["id"] == adapter_id and queued.json()["evaluation"]["status"] in ("queued", "running")
            scored = lambda body: body["evaluation"]["status"] in ("succeeded", "failed")  # noqa: E731
            again = _wait(client, f"/v1/adapters/{adapter_id}", headers, scored)["evaluation"]
            assert again["status"] == "succeeded", (again, up.log()[-3000:])
            assert (again["prompts"], again["images_per_prompt"], again["reference_images"]) == (1, 2, 1)
            assert all(-1 <= again[m] <= 1 for m in METRICS)
            # The list shows the scores too.
            listed = client.get("/v1/adapters", headers=headers).json()["data"]
            assert [a["evaluation"]["status"] for a in listed] == ["succeeded"]
    finally:
        up.stop()


def test_the_reaper_sends_lost_evaluations_again_once_per_grace(api):
    """Evaluations are jobs like the others (issue 19): one whose message was lost (queued, last sent past the
    grace, no worker busy) or whose worker died (lease expired) is sent again, stamped so that a long wait costs
    one extra message per grace period; a fresh one, a live one and an ended one are left."""
    from datetime import timedelta

    from sqlalchemy import update

    from shared.db import Adapter, Evaluation, Training, new_id, utcnow
    from shared.queue import EVALUATE_TASK
    from shared.tenants import tenant_for_key
    from workers.reaper import reap_once
    from workers.runtime import Runtime

    with api.context.sessions() as session:  # other tests' jobs in the session's database would compete
        for model in (Evaluation, Training):
            session.execute(update(model).where(model.status.in_(("queued", "running"))).values(status="canceled"))
        session.commit()
    now = utcnow()
    grace = timedelta(seconds=api.context.settings.enqueue_grace_seconds)
    old = now - grace - timedelta(minutes=10)
    rows = {
        "lost": {"status": "queued", "enqueued_at": old},
        "fresh": {"status": "queued", "enqueued_at": now},
        "crashed": {"status": "running", "lease_expires_at": old, "attempts": 1},
        "done": {"status": "succeeded", "enqueued_at": old},
    }
    ids = {}
    with api.context.sessions() as session:
        tenant = tenant_for_key(session, api.keys["acme"])
        adapter_id = new_id("adp")
        session.add(Adapter(id=adapter_id, tenant_id=tenant.id, base_model="tiny-sd", config={}, num_parameters=1,
                            size_bytes=1, sha256="0" * 64, storage_key=f"{adapter_id}.safetensors"))  # fmt: skip
        session.flush()
        for name, values in rows.items():
            ids[name] = new_id("evl")
            session.add(Evaluation(id=ids[name], tenant_id=tenant.id, adapter_id=adapter_id, base_model="tiny-sd",
                                   params={}, reference_keys=[], **values))  # fmt: skip
        session.commit()
    sent: list[tuple[str, str]] = []
    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=api.context.storage, owner="t")
    rt.send = lambda task, job_id, **_: sent.append((task, job_id))
    reap_once(rt)
    mine = {job_id for task, job_id in sent if task == EVALUATE_TASK and job_id in ids.values()}
    assert mine == {ids["lost"], ids["crashed"]}
    sent.clear()
    reap_once(rt)  # stamped when sent: not again within the grace
    assert not {job_id for _, job_id in sent} & {ids["lost"]}
