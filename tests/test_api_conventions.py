"""API conventions (issue 21): what the service accepts it serves; capabilities; offline docs; a typed params
part; webhook events with ids, types, times, a User-Agent and a filter, and the README's verify snippets; the
Idempotent-Replayed header; adapters that keep their name, prompt and identifier; the last key kept."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers.api import image_files, native_adapter_file

from shared.db import Adapter, Training
from shared.webhooks import sign, verify

README = Path(__file__).resolve().parents[1] / "README.md"


def _training(api, **params):
    data = {"instance_prompt": "a photo of sks dog", "params": json.dumps({"steps": 2, **params})}
    return api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))


def test_only_servable_adapter_shapes_are_trained_or_uploaded(api):
    """An (8, 8) training or upload used to be accepted and then refused by every generation; now both answer 422
    naming what is served, and what is accepted is exactly what GET /v1/capabilities lists."""
    capabilities = api.client.get("/v1/capabilities", headers=api.headers()).json()
    ((a1, a2),) = [(s["a1"], s["a2"]) for s in capabilities["servable_factors"]]
    assert (a1, a2) == (64, 8)
    for shape in ((8, 8), (32, 8), (64, 4), (16, 16)):  # all fit tiny-sd's layers; none is served
        refused = _training(api, a1=shape[0], a2=shape[1])
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unservable_adapter", refused.text
        assert refused.json()["error"]["details"]["servable_factors"] == [{"a1": 64, "a2": 8}]
        upload = api.client.post(
            "/v1/adapters", headers=api.headers(), files={"file": ("a.safetensors", native_adapter_file(*shape))}
        )
        assert upload.status_code == 422 and upload.json()["error"]["code"] == "unservable_adapter", upload.text
    assert _training(api, a1=a1, a2=a2).status_code == 202
    assert _training(api, target_modules=["to_q", "to_v"]).status_code == 202  # a subset is served (zeros elsewhere)
    uploaded = api.client.post(
        "/v1/adapters", headers=api.headers(), files={"file": ("a.safetensors", native_adapter_file(a1, a2))}
    )
    assert uploaded.status_code == 201, uploaded.text
    generation = {"prompt": "p", "adapter_id": uploaded.json()["id"]}
    assert api.client.post("/v1/generations", headers=api.headers(), json=generation).status_code == 202


def test_capabilities_say_what_clients_would_hard_code(api):
    body = api.client.get("/v1/capabilities", headers=api.headers()).json()
    assert body["base_model"] == "tiny-sd" and body["native_resolution"] == 64
    assert body["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert "steps" in body["training"]["params"] and body["training"]["defaults"]["a1"] == 64
    assert body["training"]["images"]["min_images"] == 2 and body["generation"]["max_num_images"] == 8
    assert body["limits"]["max_queued_jobs"] == api.context.settings.max_queued_jobs
    assert "training.succeeded" in body["webhook_events"]
    assert api.client.get("/v1/capabilities").status_code == 401


def test_docs_work_without_internet(api):
    """Swagger UI and ReDoc load their scripts from the gateway itself, not from a CDN."""
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = api.client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("/") for s in sources), sources  # nothing from another host
        for asset in assets:
            url = next(s for s in sources if s.endswith(asset))
            answer = api.client.get(url)
            assert answer.status_code == 200 and len(answer.content) > 10_000, url


def test_the_params_part_is_a_typed_json_object(api):
    spec = api.client.get("/openapi.json").json()
    form = spec["paths"]["/v1/trainings"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["encoding"] == {"params": {"contentType": "application/json"}}
    body = spec["components"]["schemas"]["Body_createTraining"]
    assert body["properties"]["params"]["allOf"] == [{"$ref": "#/components/schemas/TrainingParams"}]
    params = spec["components"]["schemas"]["TrainingParams"]
    from services.gateway.services.trainings import CLIENT_PARAMS

    assert set(params["properties"]) == CLIENT_PARAMS  # the schema and what the server accepts are one list
    assert params["additionalProperties"] is False
    create = spec["paths"]["/v1/trainings"]["post"]["responses"]
    assert create["202"]["content"]["application/json"]["example"]["status"] == "queued"
    assert create["401"]["content"]["application/json"]["example"]["error"]["code"] == "unauthorized"
    assert create["413"]["content"]["application/json"]["example"]["error"]["code"] != "training_not_found"
    assert "Idempotent-Replayed" in create["202"]["headers"]
    image = spec["paths"]["/v1/generations/{generation_id}/images/{index}"]["get"]["responses"]["200"]["content"]
    assert (
        image["image/png"]["schema"]
        == image["application/octet-stream"]["schema"]
        == {
            "type": "string",
            "format": "binary",
        }
    )


def test_an_idempotent_replay_says_so(api):
    headers = {**api.headers(), "Idempotency-Key": "once"}
    first = api.client.post("/v1/generations", headers=headers, json={"prompt": "p"})
    again = api.client.post("/v1/generations", headers=headers, json={"prompt": "p"})
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"


def test_a_tenant_cannot_revoke_its_last_key_by_accident(api):
    keys = api.client.get("/v1/api-keys", headers=api.headers()).json()["data"]
    (only,) = [k for k in keys if k["revoked_at"] is None]
    refused = api.client.delete(f"/v1/api-keys/{only['id']}", headers=api.headers())
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_api_key"
    assert api.client.get("/v1/api-keys", headers=api.headers()).status_code == 200  # still works
    second = api.client.post("/v1/api-keys", headers=api.headers(), json={"name": "new"}).json()
    assert api.client.delete(f"/v1/api-keys/{only['id']}", headers=api.headers()).status_code == 204
    new_headers = {"Authorization": f"Bearer {second['key']}"}
    assert api.client.delete(f"/v1/api-keys/{second['id']}", headers=new_headers).status_code == 409
    forced = api.client.delete(f"/v1/api-keys/{second['id']}", headers=new_headers, params={"force": "true"})
    assert forced.status_code == 204
    assert api.client.get("/v1/api-keys", headers=new_headers).status_code == 401


def test_an_uploaded_adapter_keeps_its_prompt_and_identifier_and_its_evaluation_uses_them(api):
    upload = api.client.post(
        "/v1/adapters",
        headers=api.headers(),
        files={"file": ("a.safetensors", native_adapter_file())},
        data={"name": "rex", "instance_prompt": "a photo of zwx cat"},
    ).json()
    assert (upload["name"], upload["instance_prompt"], upload["identifier"]) == ("rex", "a photo of zwx cat", "zwx")
    files = [("images", ("r.png", image_files(1)[0][1][1], "image/png"))]
    queued = api.client.post(f"/v1/adapters/{upload['id']}/evaluations", headers=api.headers(), files=files)
    assert queued.status_code == 202, queued.text
    evaluation = queued.json()["evaluation"]
    assert (evaluation["identifier"], evaluation["class_noun"]) == ("zwx", "cat")
    # Without a prompt or an identifier, an evaluation must be told the words instead of guessing "".
    bare = api.client.post(
        "/v1/adapters", headers=api.headers(), files={"file": ("a.safetensors", native_adapter_file())}
    ).json()
    refused = api.client.post(
        f"/v1/adapters/{bare['id']}/evaluations",
        headers=api.headers(),
        files=files,
        data={"params": '{"class_noun": "cat"}'},
    )
    assert refused.status_code == 422 and "identifier" in refused.json()["error"]["message"]
    told = api.client.post(
        f"/v1/adapters/{bare['id']}/evaluations",
        headers=api.headers(),
        files=files,
        data={"params": '{"class_noun": "cat", "identifier": "zwx"}'},
    )
    assert told.status_code == 202, told.text


def test_a_trained_adapter_carries_its_trainings_name_and_prompt(api, tiny_folders, monkeypatch):
    from workers.lease import claim
    from workers.runtime import Runtime
    from workers.training.job import run_claimed_training

    data = {"instance_prompt": "a photo of sks dog", "name": "rex", "params": json.dumps({"steps": 1})}
    created = api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2)).json()
    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=api.context.storage, owner="w")
    rt.send = lambda *a, **k: None
    with rt.sessions() as session:
        assert claim(session, Training, created["id"], "w", 600)
    assert run_claimed_training(rt, created["id"]) == "succeeded"
    with api.context.sessions() as session:
        adapter = session.get(Adapter, session.get(Training, created["id"]).adapter_id)
        assert (adapter.name, adapter.instance_prompt, adapter.identifier) == ("rex", "a photo of sks dog", "sks")


# Webhooks ---------------------------------------------------------------------------------------------------


def test_webhook_events_have_ids_types_times_and_a_user_agent(hooks_runtime, receiver):
    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True)
    hook = receiver()
    job, tenant = finished_training(rt, hook.url)
    assert deliver_webhook(rt, f"training:{job}") == "delivered"
    (delivery,) = hook.received
    event = json.loads(delivery["body"])
    assert set(event) == {"id", "type", "created", "data"}
    assert event["id"].startswith("evt_") and event["type"] == "training.succeeded"
    assert abs(event["created"] - time.time()) < 3600 and event["data"]["id"] == job
    assert delivery["headers"]["User-Agent"].startswith("Krona-Webhooks/")
    assert delivery["headers"]["Krona-Event-Id"] == event["id"]
    assert verify(delivery["body"], delivery["signature"], tenant.webhook_secret)


def test_a_webhook_sends_only_the_events_asked_for(hooks_runtime, receiver):
    from sqlalchemy import update

    from workers.webhooks import deliver_webhook

    make_runtime, finished_training = hooks_runtime
    rt = make_runtime(allow_private_webhooks=True)
    hook = receiver()
    job, _ = finished_training(rt, hook.url)
    with rt.sessions() as session:
        session.execute(update(Training).where(Training.id == job).values(webhook_events=["training.failed"]))
        session.commit()
    assert deliver_webhook(rt, f"training:{job}") == "filtered"
    assert hook.received == []
    with rt.sessions() as session:
        assert session.get(Training, job).webhook_state == "filtered"


def test_webhook_events_are_checked_on_create(api):
    data = {"instance_prompt": "a photo of sks dog", "webhook_events": "training.succeeded,generation.failed"}
    refused = api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))
    assert refused.status_code == 422 and "webhook_events" in refused.json()["error"]["message"]
    body = {"prompt": "p", "webhook_events": ["generation.succeeded", "training.failed"]}
    assert api.client.post("/v1/generations", headers=api.headers(), json=body).status_code == 422
    data["webhook_events"] = "training.failed, training.succeeded"
    accepted = api.client.post("/v1/trainings", headers=api.headers(), data=data, files=image_files(2))
    assert accepted.status_code == 202, accepted.text
    with api.context.sessions() as session:
        assert session.get(Training, accepted.json()["id"]).webhook_events == ["training.failed", "training.succeeded"]


def _snippet(marker: str) -> str:
    text = README.read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1]
    return block.split("```", 2)[1].split("\n", 1)[1]


def test_the_readmes_verify_snippets_accept_a_real_signature_and_refuse_a_forged_one(tmp_path):
    body, secret = b'{"id":"evt_1","type":"training.succeeded"}', "whsec_test"
    header = sign(body, secret)
    namespace: dict = {}
    exec(_snippet("verify-python"), namespace)
    assert namespace["verify"](body, header, secret)
    assert not namespace["verify"](body + b" ", header, secret)
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to check the README's shell snippet")
    (tmp_path / "body.json").write_bytes(body)
    for sig, expected in ((header, "valid"), (header[:-1] + ("0" if header[-1] != "0" else "1"), "")):
        result = subprocess.run(
            ["bash", "-c", _snippet("verify-shell")],
            cwd=tmp_path, env={"SIG": sig, "WHSEC": secret, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        )  # fmt: skip
        assert result.stdout.strip() == expected, (result.stdout, result.stderr)
