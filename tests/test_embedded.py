"""The embedded default: `krona up` and the CLI flow with no PostgreSQL, Redis or S3 at all."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers.services import KronaUp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _krona(*args, env, timeout=300):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"krona {' '.join(args)}: {result.stderr[-3000:]}"
    return result.stdout


def test_krona_up_and_the_cli_flow(tiny_folders, tmp_path):
    up = KronaUp(tmp_path)  # only the embedded settings: nothing points at a database, broker or S3 server
    data_dir, port = up.data_dir, up.base.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    env["KRONA_DATA_DIR"] = str(data_dir)
    try:
        up.wait(up.ready, "krona up ready", 120)
        key_file = data_dir / "api-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text().strip() in up.log()
        images = tmp_path / "images"
        images.mkdir()
        for i, color in enumerate(("red", "blue")):
            Image.new("RGB", (96, 96), color).save(images / f"{i}.png")
        client = ["--url", f"http://127.0.0.1:{port}", "--data-dir", str(data_dir)]
        training = json.loads(
            _krona(
                "trainings",
                "create",
                *client,
                "--images",
                str(images),
                "--prompt",
                "a photo of sks toy",
                "--params",
                '{"steps": 3, "gradient_accumulation": 1}',
                "--wait",
                env=env,
            )
        )
        assert training["status"] == "succeeded" and training["adapter_id"]
        out = tmp_path / "out"
        generation = json.loads(
            _krona(
                "generations",
                "create",
                *client,
                "--prompt",
                "a photo of sks toy",
                "--adapter-id",
                training["adapter_id"],
                "--num-images",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
                env=env,
            )
        )
        assert generation["status"] == "succeeded"
        assert sorted(p.name for p in out.iterdir()) == [f"{generation['id']}-0.png", f"{generation['id']}-1.png"]
        lyco = tmp_path / "a.safetensors"
        _krona(
            "adapters", "download", training["adapter_id"], *client, "--format", "lycoris", "--out", str(lyco), env=env
        )
        assert "LyCORIS LoKr" in _krona("inspect", str(lyco), env=env)
        listed = json.loads(_krona("trainings", "list", *client, env=env))
        assert [t["id"] for t in listed["data"]] == [training["id"]]
    finally:
        code = up.stop()
    assert code == 0
    assert "Krona stopped." in up.log()


def test_krona_up_restarts_a_killed_worker_and_the_training_finishes(tiny_folders, tmp_path):
    """The finding: `kill -9` of the worker child made `krona up` exit 1 and take the gateway down."""
    import httpx
    from sqlalchemy import func, select

    from shared.db import Adapter, Training, make_engine, make_session_factory
    from shared.settings import Settings

    up = KronaUp(tmp_path, KRONA_LEASE_SECONDS="8", KRONA_REAPER_INTERVAL_SECONDS="1", KRONA_CHECKPOINT_EVERY="2")
    data_dir, base, wait = up.data_dir, up.base, up.wait

    try:
        wait(up.ready, "krona up ready", 120)
        headers = {"Authorization": f"Bearer {(data_dir / 'api-key').read_text().strip()}"}
        files = []
        for i, color in enumerate(("red", "blue")):
            path = tmp_path / f"{i}.png"
            Image.new("RGB", (96, 96), color).save(path)
            files.append(("images", (path.name, path.read_bytes(), "image/png")))
        # 60 steps: the kill comes at the first checkpoint after step 4, long before the end (as in test_service_e2e).
        data = {"instance_prompt": "a photo of sks toy", "params": '{"steps": 60, "gradient_accumulation": 1}'}
        training = httpx.post(f"{base}/v1/trainings", headers=headers, data=data, files=files, timeout=30).json()
        sessions = make_session_factory(make_engine(Settings(data_dir=data_dir).resolved_database_url))

        def checkpointed():
            with sessions() as session:
                row = session.get(Training, training["id"])
                return row.checkpoint_key is not None and row.step >= 4

        wait(checkpointed, "a checkpoint")
        worker_pid = json.loads((data_dir / "processes.json").read_text())["worker"]["pid"]
        os.kill(worker_pid, signal.SIGKILL)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # the gateway keeps serving

        def restarted():
            processes = json.loads((data_dir / "processes.json").read_text())  # /readyz shows it to operators only
            return processes.get("worker", {}).get("restarts", 0) >= 1 and processes["worker"]["state"] == "running"

        wait(restarted, "the worker restarted", 60)

        def finished():
            body = httpx.get(f"{base}/v1/trainings/{training['id']}", headers=headers, timeout=5).json()
            return body["status"] in ("succeeded", "failed")

        wait(finished, "the training finished", 400)
        with sessions() as session:
            row = session.get(Training, training["id"])
            assert row.status == "succeeded" and row.step == 60 and row.attempts == 2, (row.status, row.error_message)
            assert session.scalar(select(func.count()).select_from(Adapter).where(Adapter.training_id == row.id)) == 1
    finally:
        code = up.stop()
    assert code == 0
    text = up.log()
    assert "worker exited with -9; restarting" in text and "Krona stopped." in text
