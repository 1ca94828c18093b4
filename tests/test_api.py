"""Every route of the HTTP API against PostgreSQL: auth, tenancy, idempotency, pagination, cancel, adapters."""

import numpy as np
import pytest
from helpers.api import RecordingEnqueuer, image_files, native_adapter_file, png
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy import update

from shared.db import Generation, Training
from shared.settings import Settings


def _create_training(api, tenant="acme", **extra):
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 5}', **extra.pop("data", {})}
    return api.client.post("/v1/trainings", headers=api.headers(tenant, **extra), data=data, files=image_files(2))


def test_auth_is_required(api):
    assert api.client.get("/v1/trainings").status_code == 401
    response = api.client.get("/v1/trainings", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_training_create_get_list_and_enqueue(api):
    response = _create_training(api)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["progress"] == {
        "step": 0,
        "total_steps": 5,
        "loss": None,
        "eta_seconds": None,
        "phase": "queued",
    }
    assert body["queue_position"] == 1
    base = f"{api.context.settings.public_url}/v1/trainings/{body['id']}"
    assert body["urls"] == {"get": base, "cancel": f"{base}/cancel", "events": f"{base}/events"}
    assert body["params"]["a1"] == 64 and body["num_images"] == 2
    assert ("krona.train", body["id"]) in api.enqueuer.sent
    assert api.client.get(f"/v1/trainings/{body['id']}", headers=api.headers()).json()["id"] == body["id"]
    keys = list(api.context.storage.list("tenants/"))
    assert len(keys) == 2 and all(f"/trainings/{body['id']}/images/" in k for k in keys)


def test_pagination_newest_first(api):
    ids = [_create_training(api).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/trainings", headers=api.headers(), params=params).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    only = api.client.get("/v1/trainings", headers=api.headers(), params={"status": "succeeded"}).json()
    assert only == {"data": [], "next_cursor": None}
    bad = api.client.get("/v1/trainings", headers=api.headers(), params={"cursor": "garbage"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"


def test_other_tenants_resources_answer_404(api):
    training = _create_training(api).json()
    generation = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x"}).json()
    batch = api.client.post("/v1/batches", headers=api.headers(), json={"generations": [{"prompt": "y"}]}).json()
    upload = api.client.post(
        "/v1/adapters",
        headers=api.headers(),
        files={"file": ("a.safetensors", native_adapter_file(), "application/octet-stream")},
    ).json()
    other = api.headers("globex")
    for path in (
        f"/v1/trainings/{training['id']}",
        f"/v1/generations/{generation['id']}",
        f"/v1/generations/{generation['id']}/images/0",
        f"/v1/batches/{batch['id']}",
        f"/v1/adapters/{upload['id']}",
        f"/v1/adapters/{upload['id']}/file",
    ):
        response = api.client.get(path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"].endswith("not_found")
    assert api.client.post(f"/v1/trainings/{training['id']}/cancel", headers=other).status_code == 404
    assert api.client.delete(f"/v1/adapters/{upload['id']}", headers=other).status_code == 404
    # globex cannot generate with acme's adapter either.
    response = api.client.post("/v1/generations", headers=other, json={"prompt": "x", "adapter_id": upload["id"]})
    assert response.status_code == 404
    assert api.client.get("/v1/trainings", headers=other).json()["data"] == []


def test_idempotent_replays_create_nothing_new(api):
    first = _create_training(api, **{"Idempotency-Key": "k1"})
    second = _create_training(api, **{"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert len(api.client.get("/v1/trainings", headers=api.headers()).json()["data"]) == 1
    assert len(list(api.context.storage.list("tenants/"))) == 2
    changed = _create_training(api, data={"instance_prompt": "another prompt"}, **{"Idempotency-Key": "k1"})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"
    # The same key from another tenant is another key.
    assert _create_training(api, "globex", **{"Idempotency-Key": "k1"}).json()["id"] != first.json()["id"]
    g1 = api.client.post(
        "/v1/generations", headers=api.headers(**{"Idempotency-Key": "g"}), json={"prompt": "p", "seed": 1}
    )
    g2 = api.client.post(
        "/v1/generations", headers=api.headers(**{"Idempotency-Key": "g"}), json={"prompt": "p", "seed": 1}
    )
    assert g1.json()["id"] == g2.json()["id"]
    b1 = api.client.post(
        "/v1/batches", headers=api.headers(**{"Idempotency-Key": "b"}), json={"generations": [{"prompt": "p"}]}
    )
    b2 = api.client.post(
        "/v1/batches", headers=api.headers(**{"Idempotency-Key": "b"}), json={"generations": [{"prompt": "p"}]}
    )
    assert b1.json()["id"] == b2.json()["id"]


def test_cancel(api):
    queued = _create_training(api).json()
    response = api.client.post(f"/v1/trainings/{queued['id']}/cancel", headers=api.headers())
    assert response.status_code == 202 and response.json()["status"] == "canceled"
    again = api.client.post(f"/v1/trainings/{queued['id']}/cancel", headers=api.headers())
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_cancelable"
    running = _create_training(api).json()
    with api.context.sessions() as session:
        session.execute(update(Training).where(Training.id == running["id"]).values(status="running"))
        session.commit()
    response = api.client.post(f"/v1/trainings/{running['id']}/cancel", headers=api.headers())
    assert response.status_code == 202 and response.json()["status"] == "canceling"  # until its worker stops it
    with api.context.sessions() as session:
        assert session.get(Training, running["id"]).cancel_requested
    listed = api.client.get("/v1/trainings", headers=api.headers(), params={"status": "canceling"}).json()["data"]
    assert [t["id"] for t in listed] == [running["id"]]


def test_generations_and_batches_cancel_like_trainings(api):
    from shared.db import Generation

    queued = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "p"}).json()
    canceled = api.client.post(f"/v1/generations/{queued['id']}/cancel", headers=api.headers())
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    again = api.client.post(f"/v1/generations/{queued['id']}/cancel", headers=api.headers())
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_cancelable"
    running = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "p"}).json()
    with api.context.sessions() as session:
        session.execute(update(Generation).where(Generation.id == running["id"]).values(status="running"))
        session.commit()
    canceling = api.client.post(f"/v1/generations/{running['id']}/cancel", headers=api.headers())
    assert canceling.status_code == 202 and canceling.json()["status"] == "canceling"
    assert canceling.json()["urls"]["cancel"].endswith(f"/v1/generations/{running['id']}/cancel")
    batch = api.client.post(
        "/v1/batches", headers=api.headers(), json={"generations": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]}
    ).json()
    first, second, _ = batch["generation_ids"]
    with api.context.sessions() as session:
        session.execute(update(Generation).where(Generation.id == first).values(status="succeeded"))
        session.execute(update(Generation).where(Generation.id == second).values(status="running"))
        session.commit()
    stopped = api.client.post(f"/v1/batches/{batch['id']}/cancel", headers=api.headers())
    assert stopped.status_code == 202, stopped.text
    counts = stopped.json()["counts"]
    assert (counts["succeeded"], counts["canceling"], counts["canceled"], counts["queued"]) == (1, 1, 1, 0)
    assert api.client.post(f"/v1/batches/{batch['id']}/cancel", headers=api.headers()).status_code == 202


def test_events_stream_ends_on_a_terminal_state(api):
    training = _create_training(api).json()
    api.client.post(f"/v1/trainings/{training['id']}/cancel", headers=api.headers())
    with api.client.stream("GET", f"/v1/trainings/{training['id']}/events", headers=api.headers()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert "event: done" in text and '"status": "canceled"' in text


def test_generation_and_batch(api):
    response = api.client.post(
        "/v1/generations", headers=api.headers(), json={"prompt": "a cat", "num_images": 2, "seed": 5}
    )
    assert response.status_code == 202
    body = response.json()
    assert body["width"] == body["height"] == 64 and body["seed"] == 5 and body["images"] == []
    assert ("krona.generate", body["id"]) in api.enqueuer.sent
    assert api.client.get(f"/v1/generations/{body['id']}/images/0", headers=api.headers()).status_code == 404
    batch = api.client.post(
        "/v1/batches", headers=api.headers(), json={"generations": [{"prompt": f"p{i}"} for i in range(3)]}
    ).json()
    assert batch["total"] == 3 and batch["counts"]["queued"] == 3 and len(batch["generation_ids"]) == 3
    got = api.client.get(f"/v1/batches/{batch['id']}", headers=api.headers()).json()
    assert got["generation_ids"] == batch["generation_ids"]


def test_adapter_upload_download_delete(api):
    native = native_adapter_file()
    response = api.client.post(
        "/v1/adapters",
        headers=api.headers(),
        data={"name": "mine", "base_model": "tiny-sd"},
        files={"file": ("a.safetensors", native, "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert adapter["config"]["a1"] == 64 and adapter["num_parameters"] == 16_800 and adapter["name"] == "mine"
    listed = api.client.get("/v1/adapters", headers=api.headers()).json()["data"]
    assert [a["id"] for a in listed] == [adapter["id"]]
    file = api.client.get(f"/v1/adapters/{adapter['id']}/file", headers=api.headers())
    assert file.status_code == 200 and load_safetensors(file.content).keys() == load_safetensors(native).keys()
    lyco = api.client.get(f"/v1/adapters/{adapter['id']}/file", headers=api.headers(), params={"format": "lycoris"})
    arrays = load_safetensors(lyco.content)
    assert all(k.startswith("lora_unet_") for k in arrays) and len(arrays) == 3 * 32
    assert "X-Krona-Note" in lyco.headers  # (64, 8) factors: the LyCORIS library cannot rebuild them
    # A LyCORIS upload of the same factors gives the same adapter.
    again = api.client.post(
        "/v1/adapters",
        headers=api.headers(),
        files={"file": ("l.safetensors", save_safetensors(arrays), "application/octet-stream")},
    )
    assert again.status_code == 201 and again.json()["num_parameters"] == 16_800
    gen = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x", "adapter_id": adapter["id"]})
    assert gen.status_code == 202
    key = "tenants/"
    before = len(list(api.context.storage.list(key)))
    assert api.client.delete(f"/v1/adapters/{adapter['id']}", headers=api.headers()).status_code == 204
    assert len(list(api.context.storage.list(key))) == before - 1
    assert api.client.get(f"/v1/adapters/{adapter['id']}", headers=api.headers()).status_code == 404


def test_readyz_metrics_and_openapi(api):
    assert api.client.get("/readyz").json()["status"] == "ready"
    api.client.get("/healthz")
    metrics = api.client.get("/metrics").text
    assert "krona_http_requests_total" in metrics
    spec = api.client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for path in (
        "/v1/trainings",
        "/v1/trainings/{training_id}",
        "/v1/trainings/{training_id}/cancel",
        "/v1/trainings/{training_id}/events",
        "/v1/adapters",
        "/v1/adapters/{adapter_id}",
        "/v1/adapters/{adapter_id}/file",
        "/v1/generations",
        "/v1/generations/{generation_id}",
        "/v1/generations/{generation_id}/images/{index}",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert "multipart/form-data" in spec["paths"]["/v1/trainings"]["post"]["requestBody"]["content"]


def test_unmigrated_database_is_refused(tmp_path):
    from services.gateway.app import create_app
    from shared.db import DatabaseNotMigrated

    settings = Settings(data_dir=tmp_path)
    with pytest.raises(DatabaseNotMigrated, match="krona migrate"):
        create_app(settings, enqueuer=RecordingEnqueuer())


def test_generated_image_is_served(api):
    gen = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "x"}).json()
    key = f"tenants/x/generations/{gen['id']}/0.png"
    api.context.storage.put_bytes(key, png(1))
    with api.context.sessions() as session:
        session.execute(
            update(Generation)
            .where(Generation.id == gen["id"])
            .values(status="succeeded", images=[{"index": 0, "key": key, "seed": 3}])
        )
        session.commit()
    body = api.client.get(f"/v1/generations/{gen['id']}", headers=api.headers()).json()
    assert body["images"][0]["url"].endswith(f"/v1/generations/{gen['id']}/images/0")
    image = api.client.get(f"/v1/generations/{gen['id']}/images/0", headers=api.headers())
    assert image.headers["content-type"] == "image/png" and image.content == png(1)


def test_gateway_imports_neither_torch_nor_workers():
    import subprocess
    import sys

    code = (
        "import sys; import services.gateway.app, shared.krona.convert, shared.models.shapes, shared.training_spec;"
        "print(sorted(m for m in ('torch', 'diffusers', 'workers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_numpy_conversion_matches_the_torch_one():
    import torch

    from shared.krona import from_lycoris, to_lycoris
    from shared.krona.convert import lycoris_arrays, native_arrays_from_upload

    native = load_safetensors(native_adapter_file(a1=8, a2=8))
    lyco_np, not_rebuildable = lycoris_arrays(native)
    lyco_torch = to_lycoris({k: torch.from_numpy(v) for k, v in native.items()})
    assert lyco_np.keys() == lyco_torch.keys() and not not_rebuildable
    for key in lyco_np:
        assert np.array_equal(lyco_np[key], lyco_torch[key].numpy())
    back, config, source = native_arrays_from_upload(lyco_np, {})
    assert source == "lycoris" and (config.a1, config.a2) == (8, 8)
    expected = from_lycoris({k: torch.from_numpy(v) for k, v in lyco_np.items()})
    for key in back:
        assert np.array_equal(back[key], expected[key].numpy())
