"""Jobs ride out dependency outages: a real worker, PostgreSQL, Redis, and a SeaweedFS this module stops and starts.

The finding (issue 9): with S3 down for 40 s a running training failed for good (`images_unreadable`)
although it had a checkpoint, and a running generation ended as `worker_lost` after 3 attempts.
"""

from __future__ import annotations

import time

import pytest
from helpers.api import image_files, wait_for
from helpers.services import SeaweedFS
from sqlalchemy import func, select

from shared.db import Adapter, Training


@pytest.fixture
def stack_s3(tmp_path_factory):
    """A SeaweedFS of this test's own, so that it can be stopped without disturbing other tests."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-outage"))
    server.start()
    yield server.info
    server.stop()


def _done(body) -> bool:
    return body["status"] in ("succeeded", "failed", "canceled")


def test_storage_outage_during_a_training_and_a_generation(stack):
    client, headers, sessions = stack["client"], stack["headers"], stack["sessions"]
    seaweed = stack["s3"]["server"]
    stack["start_worker"]("worker")
    data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 40, "gradient_accumulation": 1}'}
    training = client.post("/v1/trainings", headers=headers, data=data, files=image_files(2)).json()

    def checkpointed(body) -> bool:
        with sessions() as session:
            row = session.get(Training, training["id"])
            return row.checkpoint_key is not None and row.step >= 4

    wait_for(client, f"/v1/trainings/{training['id']}", headers, checkpointed, timeout=180)
    seaweed.stop()  # the next checkpoint (every 2 steps) meets a dead endpoint
    worker_log = stack["logs"] / "worker.log"
    deadline = time.monotonic() + 180
    while "storage_unavailable" not in worker_log.read_text():  # the worker met the outage: end it
        assert time.monotonic() < deadline, "the worker never met the storage outage"
        time.sleep(0.2)
    time.sleep(1)
    seaweed.start()
    done = wait_for(client, f"/v1/trainings/{training['id']}", headers, _done, timeout=300)
    assert done["status"] == "succeeded", done
    with sessions() as session:
        row = session.get(Training, training["id"])
        assert row.attempts == 1  # the outage did not count as a lost worker
        assert session.scalar(select(func.count()).select_from(Adapter).where(Adapter.training_id == row.id)) == 1
    assert "recovered after" in worker_log.read_text()

    # A generation while storage is down: its adapter cannot be fetched nor its images stored until it is back.
    seaweed.stop()
    request = {"prompt": "a photo of sks dog", "adapter_id": done["adapter_id"], "steps": 2, "width": 64, "height": 64}
    generation = client.post("/v1/generations", headers=headers, json=request).json()
    time.sleep(6)
    assert client.get(f"/v1/generations/{generation['id']}", headers=headers).json()["status"] in ("queued", "running")
    seaweed.start()
    result = wait_for(client, f"/v1/generations/{generation['id']}", headers, _done, timeout=180)
    assert result["status"] == "succeeded", result
    image = client.get(f"/v1/generations/{generation['id']}/images/0", headers=headers)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
