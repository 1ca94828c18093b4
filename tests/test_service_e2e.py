"""End to end: the gateway, a real Celery worker process, Redis, PostgreSQL and SeaweedFS S3.

Also the crash test: `kill -9` of the worker mid-training, a new worker, and the training resumes
from its checkpoint in storage and succeeds with exactly one adapter.
"""

import io
import os
import signal
from pathlib import Path

from helpers.api import image_files, wait_for
from PIL import Image
from safetensors.numpy import load as load_safetensors
from sqlalchemy import func, select

from shared.db import Adapter, Training

ROOT = Path(__file__).resolve().parents[1]


def test_training_then_generation_through_a_real_worker(stack):
    client, headers = stack["client"], stack["headers"]
    stack["start_worker"]("worker")
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 4, "gradient_accumulation": 1}'}
    training = client.post("/v1/trainings", headers=headers, data=data, files=image_files(3)).json()
    done = wait_for(
        client, f"/v1/trainings/{training['id']}", headers, lambda b: b["status"] in ("succeeded", "failed")
    )
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 4 and done["adapter_id"]
    # Retention: the subject's photos (and the checkpoint) leave storage once the training has ended (the worker
    # deletes them right after it records the status, so the answer that says succeeded may come first).
    storage = client.app.state.context.storage
    wait_for(client, f"/v1/trainings/{training['id']}", headers, lambda b: b["images_deleted_at"] is not None)
    assert [k for k in storage.list("tenants/") if f"/trainings/{training['id']}/" in k] == []
    adapter_id = done["adapter_id"]
    native = client.get(f"/v1/adapters/{adapter_id}/file", headers=headers)
    assert native.status_code == 200 and all(
        k.endswith((".krona_a", ".krona_b")) for k in load_safetensors(native.content)
    )
    lyco = client.get(f"/v1/adapters/{adapter_id}/file", headers=headers, params={"format": "lycoris"})
    assert any(k.endswith(".lokr_w1") for k in load_safetensors(lyco.content))

    request = {
        "prompt": "a photo of sks dog",
        "adapter_id": adapter_id,
        "num_images": 2,
        "steps": 3,
        "width": 96,
        "height": 64,
    }
    generation = client.post("/v1/generations", headers=headers, json=request).json()
    result = wait_for(
        client, f"/v1/generations/{generation['id']}", headers, lambda b: b["status"] in ("succeeded", "failed")
    )
    assert result["status"] == "succeeded", result
    assert [i["index"] for i in result["images"]] == [0, 1]
    for image in result["images"]:
        png = client.get(f"/v1/generations/{generation['id']}/images/{image['index']}", headers=headers)
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (96, 64)
    # Metering: the usage report is what the two jobs did.
    usage = client.get("/v1/usage", headers=headers, params={"granularity": "total"}).json()["data"]
    assert [(u["kind"], u["jobs"], u["images"], u["steps"], u["pixels"]) for u in usage] == [
        ("generation", 1, 2, 3, 96 * 64 * 2),
        ("training", 1, 0, 4, 4 * 64 * 64),
    ]
    assert all(u["worker_seconds"] > 0 and list(u["devices"]) == ["cpu"] for u in usage)


def test_kill_9_mid_training_resumes_from_the_checkpoint(stack):
    client, headers, sessions = stack["client"], stack["headers"], stack["sessions"]
    first = stack["start_worker"]("first")
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 60, "gradient_accumulation": 1}'}
    training = client.post("/v1/trainings", headers=headers, data=data, files=image_files(2)).json()

    def checkpointed(body):
        with sessions() as session:
            row = session.get(Training, training["id"])
            return row.checkpoint_key is not None and row.step >= 4

    wait_for(client, f"/v1/trainings/{training['id']}", headers, checkpointed, timeout=180)
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker, mid-training
    first.wait()
    with sessions() as session:
        assert session.get(Training, training["id"]).status == "running"  # its lease says a dead worker has it
    stack["start_worker"]("second")
    done = wait_for(
        client, f"/v1/trainings/{training['id']}", headers, lambda b: b["status"] in ("succeeded", "failed"), 400
    )
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 60
    with sessions() as session:
        row = session.get(Training, training["id"])
        assert row.attempts == 2
        assert session.scalar(select(func.count()).select_from(Adapter).where(Adapter.training_id == row.id)) == 1
    assert "resumes from its checkpoint" in (stack["logs"] / "second.log").read_text()
