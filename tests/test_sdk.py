"""The Python SDK (krona_sdk) against the real embedded stack (`krona up`, tiny-sd on the CPU, tiny parameters).

One stack for the module; every wait is on the job's own progress (events, polls), never a fixed sleep.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import krona_sdk
import pytest
from helpers.services import KronaUp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Tiny and quick: 64 px (tiny-sd's native size), one micro-batch per step.
PARAMS = {"steps": 40, "resolution": 64, "gradient_accumulation": 1}


@pytest.fixture(scope="module")
def stack(tiny_folders, tmp_path_factory):
    # Events every 0.1 s, so that a training of a few seconds shows several steps; tiny scoring models.
    up = KronaUp(
        tmp_path_factory.mktemp("sdk"),
        KRONA_EVENT_POLL_INTERVAL_SECONDS="0.1",
        KRONA_EVAL_CLIP_MODEL="tiny-clip",
        KRONA_EVAL_DINO_MODEL="tiny-dino",
    )
    try:
        up.wait(up.ready, "krona up ready", 120)
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (96, 96), color).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def client(stack):
    with krona_sdk.Client(stack.base, stack.api_key()) as client:
        yield client


@pytest.fixture(scope="module")
def trained(stack, photos):
    """A training followed to its end with the steps its progress callback saw."""
    seen = []
    with krona_sdk.Client(stack.base, stack.api_key()) as client:
        training = client.trainings.create(
            images=photos,
            instance_prompt="a photo of sks toy",
            params=PARAMS,
            name="sdk",
            wait=True,
            on_progress=lambda t: seen.append((t.status, t.phase, t.progress.step, t.progress.total_steps)),
        )
    return training, seen


def test_a_training_reports_its_progress_and_makes_an_adapter(trained):
    training, seen = trained
    assert training.status == "succeeded" and training.adapter_id and training.name == "sdk", training
    assert training.progress.step == training.progress.total_steps == PARAMS["steps"]
    steps = [step for _, _, step, _ in seen]
    assert steps == sorted(steps), seen  # never backwards
    assert any(0 < step < PARAMS["steps"] for step in steps), f"no step between the first and the last: {seen}"
    assert seen[-1][0] == "succeeded" and all(total == PARAMS["steps"] for *_, total in seen)
    phases = [phase for _, phase, _, _ in seen]
    assert "training" in phases and phases.index("training") < len(phases) - 1


def test_generate_returns_pil_images_and_the_generation_lists(client, trained):
    training, _ = trained
    images = client.generate("a photo of sks toy on the moon", adapter_id=training.adapter_id, num_images=2, steps=2)
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (64, 64) for i in images)
    generation = next(client.generations.list(adapter_id=training.adapter_id))
    assert generation.status == "succeeded" and generation.num_images == 2
    assert [i.size for i in client.generations.images(generation.id)] == [(64, 64), (64, 64)]


def test_the_adapter_downloads_in_both_formats_and_loads_into_a_pipeline(client, trained, stack, tmp_path):
    from krona_sdk import adapters

    from shared.models import load_pipeline

    training, _ = trained
    adapter = client.adapters.get(training.adapter_id)
    assert adapter.training_id == training.id and (adapter.config.a1, adapter.config.a2) == (64, 8)
    native = client.adapters.download(adapter.id)  # bytes
    assert isinstance(native, bytes) and len(native) == adapter.size_bytes
    lokr_path = client.adapters.download(adapter.id, format="lycoris", path=tmp_path)  # a folder: a file in it
    assert lokr_path == tmp_path / f"{adapter.id}.lycoris.safetensors"
    native_path = tmp_path / "native.safetensors"
    native_path.write_bytes(native)

    state_dict, config, metadata = adapters.load_adapter(native_path)
    assert (config.a1, config.a2) == (64, 8) and metadata["base_model"] == "tiny-sd"
    from safetensors.torch import load_file

    converted = adapters.from_lycoris(load_file(lokr_path))
    assert converted.keys() == state_dict.keys() and all((converted[k] == state_dict[k]).all() for k in state_dict)

    # From the API's URL (with the key) into a pipeline; merged and unmerged exactly.
    pipe = load_pipeline("tiny-sd", device="cpu")
    url = f"{stack.base}/v1/adapters/{adapter.id}/file"
    layers = adapters.load_into_pipeline(pipe, url, headers={"Authorization": f"Bearer {stack.api_key()}"})
    assert len(layers) == len({k.rsplit(".", 1)[0] for k in state_dict})
    layer = pipe.unet.get_submodule(layers[0])
    before = layer.base_layer.weight.detach().clone()
    adapters.merge(pipe)
    assert (layer.base_layer.weight - before).abs().max() > 0  # the trained factors are not zero
    adapters.unmerge(pipe)
    assert (layer.base_layer.weight - before).abs().max() < 1e-6


def test_a_running_training_is_canceled(client, photos):
    training = client.trainings.create(
        images=[photos / "0.png", photos / "1.png"],
        instance_prompt="a photo of sks toy",
        params={**PARAMS, "steps": 5000},
    )
    for event in client.trainings.events(training.id):  # until it has made a step
        if event.training.progress.step >= 1:
            break
    assert client.trainings.cancel(training.id).id == training.id
    ended = client.trainings.wait(training.id)
    assert ended.status == "canceled" and ended.adapter_id is None
    client.trainings.delete(training.id)
    with pytest.raises(krona_sdk.NotFound):
        client.trainings.get(training.id)


def test_errors_are_typed(client, stack, photos):
    with pytest.raises(krona_sdk.NotFound) as caught:
        client.trainings.get("trn_00000000000000000000000a")
    assert caught.value.status == 404 and caught.value.code == "training_not_found" and caught.value.request_id
    with pytest.raises(krona_sdk.InvalidRequest) as caught:
        client.trainings.create(images=photos, instance_prompt="a photo of sks toy", params={"no_such_param": 1})
    assert caught.value.status == 422 and caught.value.code == "invalid_params"
    assert "no_such_param" in str(caught.value)
    stranger = krona_sdk.Client(stack.base, "krona_not-a-real-key")
    with stranger, pytest.raises(krona_sdk.AuthenticationError) as caught:
        stranger.adapters.list_page()
    assert caught.value.status == 401
    with pytest.raises(krona_sdk.Conflict):
        client.trainings.cancel(client.trainings.list_page(status="succeeded").data[0].id)


def test_an_unreachable_server_is_an_api_connection_error():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        client = krona_sdk.Client(f"http://127.0.0.1:{port}", "k", max_retries=1)
        with client, pytest.raises(krona_sdk.APIConnectionError, match="is `krona up` running") as caught:
            client.trainings.get("trn_x")
    assert caught.value.url == f"http://127.0.0.1:{port}"


def _admin_key(stack) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "admin", "create-admin-key", "--data-dir", str(stack.data_dir),
         "-o", "json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"},
    )  # fmt: skip
    return json.loads(out.stdout)["key"]


def test_a_rate_limited_tenant_is_retried_after_retry_after(stack):
    with krona_sdk.Client(stack.base, _admin_key(stack)) as admin:
        created = admin.tenants.create("limited", limits={"rate_limit_per_second": 1, "rate_limit_burst": 1})
        assert created.api_key.startswith("krona_") and created.webhook_secret.startswith("whsec_")
        tenant = admin.tenants.get(created.tenant.id)
        assert tenant.effective_limits["rate_limit_burst"] == 1
        assert created.tenant.id in [t.id for t in admin.tenants.list()]

        statuses = []
        hooks = {"response": [lambda response: statuses.append(response.status_code)]}
        with krona_sdk.Client(stack.base, created.api_key, http_client=httpx.Client(event_hooks=hooks)) as limited:
            for _ in range(3):  # a burst of 1 token refilled at 1/s: the later calls wait for Retry-After
                assert limited.adapters.list_page().data == []
        assert statuses.count(429) >= 1 and statuses.count(200) == 3, statuses

        updated = admin.tenants.update(tenant.id, weight=2.5, clear=["rate_limit_burst"])
        assert updated.weight == 2.5 and "rate_limit_burst" not in updated.limits
        admin.tenants.delete(tenant.id)
        with pytest.raises(krona_sdk.NotFound):
            admin.tenants.get(tenant.id)
        with pytest.raises(krona_sdk.PermissionDenied):
            admin.adapters.list_page()  # an admin key has no tenant


def test_lists_page_through_every_page(client):
    made = [client.api_keys.create(f"page-{i}") for i in range(3)]
    assert all(k.key and k.key.startswith("krona_") for k in made)
    first = client.api_keys.list_page(limit=1)
    assert len(first.data) == 1 and first.next_cursor
    every = [k.id for k in client.api_keys.list(limit=1)]  # pages of one
    assert len(every) == len(set(every)) >= 4 and {k.id for k in made} <= set(every)
    assert every[0] == first.data[0].id
    for key in made:
        client.api_keys.revoke(key.id)
    with krona_sdk.Client(client.base_url, made[0].key) as revoked, pytest.raises(krona_sdk.AuthenticationError):
        revoked.adapters.list_page()


def test_batches_usage_and_the_webhook_secret(client, trained):
    training, _ = trained
    batch = client.batches.create(
        [{"prompt": "a", "steps": 1}, {"prompt": "b", "steps": 1, "adapter_id": training.adapter_id}], wait=True
    )
    assert batch.done and batch.counts["succeeded"] == 2 and len(batch.generation_ids) == 2
    assert client.batches.get(batch.id).total == 2
    assert batch.id in [b.id for b in client.batches.list()]
    generations = list(client.generations.list(batch_id=batch.id))
    assert sorted(g.id for g in generations) == sorted(batch.generation_ids)
    client.generations.delete(generations[0].id)
    with pytest.raises(krona_sdk.NotFound):
        client.generations.get(generations[0].id)

    usage = client.usage(granularity="total")
    kinds = {period.kind for period in usage.data}
    assert {"training", "generation"} <= kinds and all(p.jobs >= 1 for p in usage.data)
    secret = client.webhook_secret.rotate()
    assert secret.webhook_secret.startswith("whsec_")


def test_the_async_client_creates_waits_and_gets(stack, photos):
    async def run():
        seen = []
        async with krona_sdk.AsyncClient(stack.base, stack.api_key()) as client:
            training = await client.trainings.create(
                images=photos,
                instance_prompt="a photo of sks toy",
                params={**PARAMS, "steps": 10},
                wait=True,
                on_progress=lambda t: seen.append(t.progress.step),
            )
            again = await client.trainings.get(training.id)
            listed = [t.id async for t in client.trainings.list(limit=1)]
            generation = await client.generations.create("a", steps=1, wait=True)
            return training, again, listed, generation, seen

    training, again, listed, generation, seen = asyncio.run(run())
    assert training.status == again.status == "succeeded" and again.adapter_id == training.adapter_id
    assert training.id in listed and seen and seen[-1] == 10
    assert generation.status == "succeeded"


def test_capabilities_and_canceling_queued_generations_and_batches(client, photos):
    capabilities = client.capabilities()
    assert capabilities.base_model == "tiny-sd" and capabilities.native_resolution == 64
    assert {"a1": 64, "a2": 8} in capabilities.servable_factors and "to_q" in capabilities.target_modules
    # The embedded stack has one job worker: while a long training runs, generations wait in the queue.
    busy = client.trainings.create(
        images=photos, instance_prompt="a photo of sks toy", params={**PARAMS, "steps": 5000}
    )
    for event in client.trainings.events(busy.id):
        if event.training.status == "running":
            break
    generation = client.generations.create("a", steps=1)
    assert generation.status == "queued" and generation.phase == "queued"
    canceled = client.generations.cancel(generation.id)
    assert canceled.status == "canceled" and canceled.done
    batch = client.batches.create([{"prompt": "a", "steps": 1}, {"prompt": "b", "steps": 1}])
    batch = client.batches.cancel(batch.id)
    assert batch.counts.get("canceled") == 2 and batch.done and batch.status == "canceled"
    client.trainings.cancel(busy.id)
    assert client.trainings.wait(busy.id).status == "canceled"
