"""End to end: the gateway, a real Celery worker process, Redis, PostgreSQL and SeaweedFS S3.

Also the crash test: `kill -9` of the worker mid-training, a new worker, and the training resumes
from its checkpoint in storage and succeeds with exactly one adapter.
"""

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from api_helpers import image_files
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import load as load_safetensors
from sqlalchemy import func, select

from shared.db import Adapter, Training, make_engine, make_session_factory
from shared.storage import S3Storage
from shared.tenants import create_tenant

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stack(postgres_url, redis_url, s3_server, tiny_folders, tmp_path, monkeypatch):
    bucket = f"e2e{uuid.uuid4().hex[:10]}"
    S3Storage(
        endpoint=s3_server["endpoint"],
        bucket=bucket,
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
    ).ensure_bucket()
    env = {
        "KRONA_DATABASE_URL": postgres_url,
        "KRONA_BROKER_URL": redis_url,
        "KRONA_S3_ENDPOINT": s3_server["endpoint"],
        "KRONA_S3_ACCESS_KEY": s3_server["access_key"],
        "KRONA_S3_SECRET_KEY": s3_server["secret_key"],
        "KRONA_S3_BUCKET": bucket,
        "KRONA_BASE_MODEL": "tiny-sd",
        "KRONA_DATA_DIR": str(tmp_path),
        "KRONA_LEASE_SECONDS": "8",
        "KRONA_REAPER_INTERVAL_SECONDS": "1",
        "KRONA_ENQUEUE_GRACE_SECONDS": "600",
        "KRONA_CHECKPOINT_EVERY": "2",
        "KRONA_WORKER_DEVICE": "cpu",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.queue import celery_app
    from shared.settings import Settings, get_settings

    get_settings.cache_clear()
    celery_app.cache_clear()
    from services.gateway.app import create_app

    app = create_app(Settings())
    sessions = make_session_factory(make_engine(postgres_url))
    with sessions() as session:
        _, key = create_tenant(session, f"e2e-{uuid.uuid4().hex[:6]}")
        session.commit()
    workers: list[subprocess.Popen] = []

    def start_worker(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "services.cli.main", "worker", "--queues", "train,infer"]
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        workers.append(process)
        return process

    with TestClient(app) as client:
        yield {
            "client": client,
            "headers": {"Authorization": f"Bearer {key}"},
            "sessions": sessions,
            "start_worker": start_worker,
            "logs": tmp_path,
        }
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    get_settings.cache_clear()
    celery_app.cache_clear()


def _wait(client, path, headers, until, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path, headers=headers).json()
        if until(body):
            return body
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting on {path}: {body}")


def test_training_then_generation_through_a_real_worker(stack):
    client, headers = stack["client"], stack["headers"]
    stack["start_worker"]("worker")
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 4, "gradient_accumulation": 1}'}
    training = client.post("/v1/trainings", headers=headers, data=data, files=image_files(3)).json()
    done = _wait(client, f"/v1/trainings/{training['id']}", headers, lambda b: b["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 4 and done["adapter_id"]
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
    result = _wait(
        client, f"/v1/generations/{generation['id']}", headers, lambda b: b["status"] in ("succeeded", "failed")
    )
    assert result["status"] == "succeeded", result
    assert [i["index"] for i in result["images"]] == [0, 1]
    for image in result["images"]:
        png = client.get(f"/v1/generations/{generation['id']}/images/{image['index']}", headers=headers)
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (96, 64)


def test_kill_9_mid_training_resumes_from_the_checkpoint(stack):
    client, headers, sessions = stack["client"], stack["headers"], stack["sessions"]
    first = stack["start_worker"]("first")
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 300, "gradient_accumulation": 1}'}
    training = client.post("/v1/trainings", headers=headers, data=data, files=image_files(2)).json()

    def checkpointed(body):
        with sessions() as session:
            row = session.get(Training, training["id"])
            return row.checkpoint_key is not None and row.step >= 4

    _wait(client, f"/v1/trainings/{training['id']}", headers, checkpointed, timeout=180)
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker, mid-training
    first.wait()
    with sessions() as session:
        assert session.get(Training, training["id"]).status == "running"  # its lease says a dead worker has it
    stack["start_worker"]("second")
    done = _wait(
        client, f"/v1/trainings/{training['id']}", headers, lambda b: b["status"] in ("succeeded", "failed"), 400
    )
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 300
    with sessions() as session:
        row = session.get(Training, training["id"])
        assert row.attempts == 2
        assert session.scalar(select(func.count()).select_from(Adapter).where(Adapter.training_id == row.id)) == 1
    assert "resumes from its checkpoint" in (stack["logs"] / "second.log").read_text()
