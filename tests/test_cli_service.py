"""The `krona` client commands against the real embedded stack (`krona up`, tiny-sd on the CPU), as a user runs
them: every group of the API, their output formats, waiting with phases, Ctrl-C, and `krona up` itself."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.services import KronaUp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "64", "--gradient-accumulation", "1"]


@pytest.fixture(scope="module")
def stack(tiny_folders, tmp_path_factory):
    up = KronaUp(
        tmp_path_factory.mktemp("cli"),
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
        Image.new("RGB", (96, 96), color).save(folder / f"toy{i}.png")
    return folder


def environment(stack, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    return {**env, "KRONA_URL": stack.base, "KRONA_DATA_DIR": str(stack.data_dir), **extra}


def krona(stack, *args: str, status: int = 0, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=environment(stack, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == status, f"krona {' '.join(args)}: {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(stack, photos):
    result = krona(stack, "trainings", "create", "--images", str(photos), "--prompt", "a photo of sks toy",
                   "--steps", "30", *TINY, "--name", "cli", "--wait")  # fmt: skip
    return json.loads(result.stdout), result.stderr


def test_a_training_waits_with_its_phases_and_ends_succeeded(trained):
    training, shown = trained
    assert training["status"] == "succeeded" and training["adapter_id"] and training["name"] == "cli"
    assert "queued: 3 images, 30 steps" in shown
    assert "training  " in shown and "/30 steps" in shown and "ETA" in shown  # the bar, with the server's ETA
    assert "succeeded after" in shown and f"adapter {training['adapter_id']}" in shown


def test_adapters_generations_and_batches(stack, trained, tmp_path):
    training, _ = trained
    adapter = krona(stack, "adapters", "list", "--limit", "1", "-o", "id").stdout.strip()
    assert adapter == training["adapter_id"]
    detail = krona(stack, "adapters", "get", adapter, "-o", "table").stdout
    assert "id:" in detail and adapter in detail and "config.a1:" in detail
    krona(stack, "adapters", "download", adapter, "--format", "lycoris", "--out", str(tmp_path / "l.safetensors"))
    assert "LyCORIS LoKr" in krona(stack, "inspect", str(tmp_path / "l.safetensors")).stdout

    images = tmp_path / "images"
    result = krona(stack, "generations", "create", "--prompt", "a photo of sks toy", "--adapter-id", adapter,
                   "--num-images", "2", "--steps", "2", "--out", str(images))  # fmt: skip
    generation = json.loads(result.stdout)
    assert generation["status"] == "succeeded"
    assert sorted(p.name for p in images.iterdir()) == [f"{generation['id']}-0.png", f"{generation['id']}-1.png"]
    listed = json.loads(krona(stack, "generations", "list", "--adapter-id", adapter).stdout)
    assert generation["id"] in [g["id"] for g in listed["data"]]

    batch_images = tmp_path / "batch"
    result = krona(stack, "batches", "create", "--prompt", "a", "--prompt", "b", "--steps", "1", "--adapter-id",
                   adapter, "--wait", "--out", str(batch_images))  # fmt: skip
    batch = json.loads(result.stdout)
    assert batch["counts"]["succeeded"] == 2 and "generations" in result.stderr
    assert sorted(p.name.split("-")[0] for p in batch_images.iterdir()) == sorted(batch["generation_ids"])
    assert yaml.safe_load(krona(stack, "batches", "get", batch["id"], "-o", "yaml").stdout)["total"] == 2
    table = krona(stack, "batches", "list", "-o", "table").stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "TOTAL", "QUEUED"] and batch["id"] in table

    krona(stack, "generations", "delete", generation["id"])
    gone = krona(stack, "generations", "get", generation["id"], status=2)
    assert "generation_not_found" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1


def test_keys_usage_webhook_secret_and_tenants(stack, trained):
    key = json.loads(krona(stack, "api-keys", "create", "--name", "ci", "-o", "json").stdout)
    assert key["key"].startswith("krona_")
    assert key["id"] in krona(stack, "api-keys", "list", "-o", "table").stdout
    krona(stack, "api-keys", "revoke", key["id"])
    assert "(HTTP 401" in krona(stack, "adapters", "list", "--api-key", key["key"], status=2).stderr

    usage = json.loads(krona(stack, "usage", "--granularity", "total").stdout)
    assert "training" in {row["kind"] for row in usage["data"]}
    assert "PERIOD" in krona(stack, "usage", "-o", "table").stdout
    assert krona(stack, "webhook-secret", "rotate", "-o", "table").stdout.startswith("whsec_")

    admin = json.loads(krona(stack, "admin", "create-admin-key", "--name", "ops", "-o", "json").stdout)["key"]
    created = json.loads(krona(stack, "tenants", "create", "acme", "--weight", "2", "-o", "json",
                               KRONA_ADMIN_KEY=admin).stdout)  # fmt: skip
    tenant = created["tenant"]["id"]
    assert created["api_key"].startswith("krona_") and created["tenant"]["weight"] == 2
    assert "acme" in krona(stack, "tenants", "list", "-o", "wide", KRONA_ADMIN_KEY=admin).stdout
    updated = krona(stack, "tenants", "update", tenant, "--max-queued-jobs", "7", "-o", "json", KRONA_ADMIN_KEY=admin)
    assert json.loads(updated.stdout)["limits"] == {"max_queued_jobs": 7}
    assert "add --yes" in krona(stack, "tenants", "delete", tenant, status=2, KRONA_ADMIN_KEY=admin).stderr
    krona(stack, "tenants", "delete", tenant, "--yes", KRONA_ADMIN_KEY=admin)
    assert "tenant_not_found" in krona(stack, "tenants", "get", tenant, status=2, KRONA_ADMIN_KEY=admin).stderr
    assert "admin list-tenants" not in krona(stack, "admin", "list-tenants").stderr


def test_an_adapter_is_evaluated_and_a_training_deleted(stack, trained, photos):
    training, _ = trained
    result = krona(stack, "adapters", "evaluate", training["adapter_id"], "--images", str(photos / "toy0.png"),
                   "--class-noun", "toy", "--prompts", "1", "--per-prompt", "1", "--steps", "1", "--wait")  # fmt: skip
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation["status"] == "succeeded" and evaluation["clip_i"] is not None
    krona(stack, "trainings", "delete", training["id"])
    assert "training_not_found" in krona(stack, "trainings", "get", training["id"], status=2).stderr


def test_ctrl_c_stops_the_waiting_not_the_training(stack, photos):
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "trainings", "create", "--images", str(photos), "--prompt",
         "a photo of sks toy", "--steps", "5000", *TINY, "--wait"],
        cwd=ROOT, env=environment(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stderr:  # until the training makes steps (not a fixed time)
        if " steps" in line and "training  " in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    training_id = err.split("krona trainings wait ")[1].split()[0]
    assert "goes on on the server" in err and "Traceback" not in err
    assert json.loads(krona(stack, "trainings", "get", training_id).stdout)["status"] == "running"
    krona(stack, "trainings", "cancel", training_id)
    ended = krona(stack, "trainings", "wait", training_id, status=1)  # canceled: not a success
    assert json.loads(ended.stdout)["status"] == "canceled"


def test_capabilities_and_canceling_generations_and_batches(stack, photos):
    capabilities = json.loads(krona(stack, "capabilities").stdout)
    assert capabilities["base_model"] == "tiny-sd" and "tiny-sd" in krona(stack, "capabilities", "-o", "table").stdout
    busy = json.loads(krona(stack, "trainings", "create", "--images", str(photos), "--prompt", "a photo of sks toy",
                            "--steps", "5000", *TINY).stdout)  # fmt: skip
    with httpx.stream("GET", f"{stack.base}/v1/trainings/{busy['id']}/events", timeout=120,
                      headers={"Authorization": f"Bearer {stack.api_key()}"}) as events:  # fmt: skip
        for line in events.iter_lines():  # until the worker has taken it: the generations below then wait
            if '"status":"running"' in line.replace(" ", ""):
                break
    generation = json.loads(krona(stack, "generations", "create", "--prompt", "a", "--steps", "1").stdout)
    canceled = krona(stack, "generations", "cancel", generation["id"])
    assert json.loads(canceled.stdout)["status"] == "canceled" and "canceled" in canceled.stderr
    batch = json.loads(krona(stack, "batches", "create", "--prompt", "a", "--prompt", "b", "--steps", "1").stdout)
    assert json.loads(krona(stack, "batches", "cancel", batch["id"]).stdout)["counts"]["canceled"] == 2
    krona(stack, "trainings", "cancel", busy["id"])
    krona(stack, "trainings", "wait", busy["id"], status=1)


def test_krona_up_holds_its_folder_and_keeps_access_lines_in_its_log(stack):
    refused = krona(stack, "up", "--data-dir", str(stack.data_dir), "--port", "1", status=2)
    assert "another `krona up`" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    shown = stack.log()
    assert shown.index("starting Krona") < shown.index("Krona is up")
    assert '"GET /readyz' not in shown and "/readyz 200" in (stack.data_dir / "logs" / "gateway.log").read_text()


def test_krona_up_says_up_only_when_ready_and_stops_without_a_traceback(tiny_folders, tmp_path):
    up = KronaUp(tmp_path)
    try:
        up.wait(lambda: "Krona is up" in up.log(), "Krona is up", 120)
        assert httpx.get(f"{up.base}/readyz", timeout=5).status_code == 200
    finally:
        code = up.stop()
    log = up.log()
    assert code == 0 and "Krona stopped." in log and "Traceback" not in log and "did not stop in time" not in log
