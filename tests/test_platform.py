"""Multi-tenant platform features (issue 11, first part): generation and batch lists, the per-request compute cap."""

from __future__ import annotations


def test_generation_and_batch_lists_filter_page_and_stay_within_the_tenant(api):
    headers = api.headers()
    first = api.client.post("/v1/generations", headers=headers, json={"prompt": "one"}).json()
    batch = api.client.post(
        "/v1/batches", headers=headers, json={"generations": [{"prompt": "b1"}, {"prompt": "b2"}]}
    ).json()
    api.client.post("/v1/generations", headers=api.headers("globex"), json={"prompt": "theirs"})

    listed = api.client.get("/v1/generations", headers=headers).json()
    assert {g["id"] for g in listed["data"]} == {first["id"], *batch["generation_ids"]}
    in_batch = api.client.get("/v1/generations", headers=headers, params={"batch_id": batch["id"]}).json()
    assert sorted(g["id"] for g in in_batch["data"]) == batch["generation_ids"]
    assert api.client.get("/v1/generations", headers=headers, params={"status": "succeeded"}).json()["data"] == []
    none = api.client.get("/v1/generations", headers=headers, params={"adapter_id": "adp_000000000000000000000000"})
    assert none.json()["data"] == []

    seen, cursor = [], None
    while True:  # pages of one, newest first
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/generations", headers=headers, params=params).json()
        seen += [g["id"] for g in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(g["id"] for g in listed["data"]) and len(seen) == 3

    batches = api.client.get("/v1/batches", headers=headers).json()
    assert [b["id"] for b in batches["data"]] == [batch["id"]] and batches["data"][0]["counts"]["queued"] == 2
    assert api.client.get("/v1/batches", headers=api.headers("globex")).json()["data"] == []


def test_a_generation_over_the_compute_cap_is_422_and_writes_nothing(api):
    """The finding: a 2048x2048, 150-step, 8-image generation was accepted."""
    huge = {"prompt": "x", "width": 2048, "height": 2048, "steps": 150, "num_images": 8}
    response = api.client.post("/v1/generations", headers=api.headers(), json=huge)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "compute_limit" and f"{api.context.settings.max_generation_compute:,}" in error["message"]
    assert error["details"]["compute"] == 2048 * 2048 * 150 * 8
    in_batch = api.client.post(
        "/v1/batches", headers=api.headers(), json={"generations": [{"prompt": "ok"}, huge]}
    ).json()["error"]
    assert in_batch["code"] == "compute_limit" and in_batch["message"].startswith("generations[1]: ")
    assert api.client.get("/v1/generations", headers=api.headers()).json()["data"] == []
    assert api.enqueuer.sent == []
    ok = {"prompt": "x", "width": 1024, "height": 1024, "steps": 50, "num_images": 4}  # exactly the default cap
    assert api.client.post("/v1/generations", headers=api.headers(), json=ok).status_code == 202


def test_a_base_model_the_server_cannot_read_answers_503_naming_it(api, tmp_path, monkeypatch):
    import huggingface_hub
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.storage import LocalStorage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (an earlier test may have imported it): set what it read,
    # or the gateway reaches for the Hub and waits out the network's timeouts (23 s here) before the same 503.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = api.context.settings.model_copy(update={"base_model": "nobody-krona/no-such-model"})
    app = create_app(settings, enqueuer=api.enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    import services.gateway.context as context_module

    reads = []
    real_unet_config = context_module.unet_config
    monkeypatch.setattr(context_module, "unet_config", lambda name: reads.append(name) or real_unet_config(name))
    with TestClient(app) as client:
        answers = [client.post("/v1/generations", headers=api.headers(), json={"prompt": "x"}) for _ in range(3)]
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "30"
        error = answer.json()["error"]
        assert error["code"] == "base_model_unavailable" and "nobody-krona/no-such-model" in error["message"]
    # Read once: the next creates are answered from that failure (a Hub id with no network can take 20 s a read).
    assert reads == ["nobody-krona/no-such-model"]
