"""The `krona` command's one-line errors (exit status 2), its waiting (Retry-After, Ctrl-C) and its output formats,
each against what provokes it: no server, a fake API server that answers as told, a held data folder.
`krona` runs as a subprocess, as a user runs it."""

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {
    "id": "trn_0123456789abcdef01234567",
    "status": "running",
    "base_model": "tiny-sd",
    "instance_prompt": "a photo of sks toy",
    "progress": {"step": 3, "total_steps": 40, "loss": 0.5, "eta_seconds": 12.0, "phase": "training"},
    "params": {"steps": 40},
    "num_images": 2,
    "created_at": "2026-11-29T10:00:00+00:00",
    "updated_at": "2026-11-29T10:00:00+00:00",
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    env.update(extra)
    return env


def krona(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=cwd,
        env={**_env(PYTHONPATH=str(ROOT)), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def refused_url():
    """A port that is bound but not listening: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), ("red", "blue")[i]).save(folder / f"dog{i}.png")
    return folder


class FakeApi:
    """A threaded HTTP server whose answers are ``routes[(method, path)]``: a list of (status, headers, body)
    taken in turn (the last repeats); body "SSE-HOLD" streams one progress event and then keeps the stream open."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list] = {}
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                api.requests.append((self.command, path))
                answers = api.routes.get((self.command, path)) or [
                    (404, {}, {"error": {"code": "not_found", "message": "no route"}})
                ]
                status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
                if body == "SSE-HOLD":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    self.wfile.write(f"event: progress\ndata: {json.dumps(TRAINING)}\n\n".encode())
                    self.wfile.flush()
                    with contextlib.suppress(OSError):
                        while True:
                            time.sleep(0.2)
                            self.wfile.write(b": ping\n\n")
                            self.wfile.flush()
                    return
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Request-ID", "req-test")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    fake = FakeApi()
    yield fake
    fake.close()


# No server ---------------------------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_line(refused_url):
    result = krona("trainings", "list", "--url", refused_url, "--api-key", "k")
    line = one_line_error(result)
    assert (
        line == f"krona trainings list: error: cannot reach {refused_url}: is krona up running? set --url or KRONA_URL"
    )
    result = krona("adapters", "list", "--api-key", "k", env={"KRONA_URL": refused_url})
    assert refused_url in one_line_error(result)


def test_images_may_be_one_file_several_or_a_glob_and_wrong_ones_are_named(photos, refused_url):
    common = ["trainings", "create", "--prompt", "a photo of sks dog", "--url", refused_url, "--api-key", "k"]
    # One file (was NotADirectoryError), two files, a glob: accepted; the request then fails to connect.
    for images in ([str(photos / "dog0.png")], [str(photos / "dog0.png"), str(photos / "dog1.png")],
                   [str(photos / "dog*.png")], [str(photos)]):  # fmt: skip
        assert "cannot reach" in one_line_error(krona(*common, "--images", *images))
    assert "no such file or folder: " in one_line_error(krona(*common, "--images", str(photos / "cat.png")))
    assert "no file matches" in one_line_error(krona(*common, "--images", str(photos / "*.jpg")))
    empty = photos.parent / "empty"
    empty.mkdir()
    assert "no PNG/JPEG/WebP images in the folder" in one_line_error(krona(*common, "--images", str(empty)))


def test_no_api_key_says_where_one_comes_from(tmp_path, refused_url):
    line = one_line_error(krona("trainings", "list", "--url", refused_url, cwd=tmp_path))
    assert "no API key" in line and "KRONA_API_KEY" in line and "krona up" in line
    line = one_line_error(krona("tenants", "list", "--url", refused_url, cwd=tmp_path))
    assert "KRONA_ADMIN_KEY" in line


def test_admin_refuses_to_create_a_database(tmp_path):
    for args in (["admin", "list-tenants"], ["admin", "create-tenant", "acme"], ["admin", "usage"]):
        line = one_line_error(krona(*args, cwd=tmp_path))
        assert "no database at" in line and "krona up" in line and "krona migrate" in line
    assert not (tmp_path / ".krona").exists()
    # A folder that exists without a migrated database: the same, and nothing is created in it.
    (tmp_path / "data").mkdir()
    assert "no database at" in one_line_error(krona("admin", "list-tenants", "--data-dir", str(tmp_path / "data")))
    assert list((tmp_path / "data").iterdir()) == []


def test_a_second_krona_up_on_the_same_data_folder_or_port_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "up.lock", "a+") as held:  # what a running `krona up` holds
        held.write("pid 4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_line_error(krona("up", "--data-dir", str(data), "--port", "1"))
    assert "another `krona up` (pid 4242) is using" in line and str(data) in line
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        line = one_line_error(krona("up", "--data-dir", str(tmp_path / "other"), "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line


def test_eval_loads_its_scoring_models_before_generating(model_cache, tmp_path, photos):
    out = tmp_path / "eval"
    result = krona(
        "eval", "--base", "tiny-sd", "--images", str(photos), "--class-noun", "dog", "--per-prompt", "1",
        "--steps", "1", "--clip", "no-such-owner/no-such-clip", "--dino", "tiny-dino", "--out", str(out),
        env={"HF_HUB_OFFLINE": "1", "KRONA_MODEL_CACHE": str(model_cache)},
    )  # fmt: skip
    line = one_line_error(result)
    assert "--clip no-such-owner/no-such-clip: cannot load the scoring model" in line
    assert not (out / "images").exists() or not any((out / "images").iterdir())  # nothing was generated


# A fake server -----------------------------------------------------------------------------------------------


def test_api_errors_are_one_line_with_the_code(api):
    api.routes[("GET", "/v1/trainings/trn_nope")] = [
        (404, {}, {"error": {"code": "training_not_found", "message": "no training 'trn_nope'"}})
    ]
    line = one_line_error(krona("trainings", "get", "trn_nope", "--url", api.url, "--api-key", "k"))
    assert line == "krona trainings get: error: no training 'trn_nope' (HTTP 404 training_not_found)"
    api.routes[("GET", "/v1/adapters")] = [(401, {}, {"error": {"code": "unauthorized", "message": "invalid key"}})]
    assert "(HTTP 401 unauthorized)" in one_line_error(krona("adapters", "list", "--url", api.url, "--api-key", "k"))


def test_output_is_json_when_piped_and_a_table_yaml_or_ids_on_request(api):
    api.routes[("GET", f"/v1/trainings/{TRAINING['id']}")] = [(200, {}, {**TRAINING, "a_newer_field": 1})]
    api.routes[("GET", "/v1/trainings")] = [(200, {}, {"data": [TRAINING], "next_cursor": None})]
    common = ["--url", api.url, "--api-key", "k"]
    piped = krona("trainings", "get", TRAINING["id"], *common)
    assert piped.returncode == 0, piped.stderr
    printed = json.loads(piped.stdout)  # what the server sent, a field the client does not know included
    for name in ("created_at", "updated_at"):
        assert datetime.fromisoformat(printed.pop(name)) == datetime.fromisoformat(TRAINING[name])
    assert printed == {k: v for k, v in TRAINING.items() if not k.endswith("_at")} | {"a_newer_field": 1}
    table = krona("trainings", "list", *common, "-o", "table").stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "NAME", "STATUS", "PHASE", "STEP"] and TRAINING["id"] in table[1]
    assert "3/40" in table[1] and "training" in table[1]
    assert json.loads(krona("trainings", "list", *common).stdout)["data"][0]["id"] == TRAINING["id"]
    yaml_text = krona("trainings", "get", TRAINING["id"], *common, "-o", "yaml").stdout
    import yaml

    assert yaml.safe_load(yaml_text)["progress"] == TRAINING["progress"]
    assert krona("trainings", "list", *common, "-o", "id").stdout == f"{TRAINING['id']}\n"


def test_waiting_honours_retry_after_and_the_exit_status_follows_the_job(api):
    path = f"/v1/trainings/{TRAINING['id']}"
    api.routes[("GET", f"{path}/events")] = [
        (429, {"Retry-After": "1"}, {"error": {"code": "too_many_streams", "message": "too many streams"}})
    ]
    done = {**TRAINING, "status": "succeeded", "adapter_id": "adp_1", "progress": {**TRAINING["progress"], "step": 40}}
    api.routes[("GET", path)] = [
        (429, {"Retry-After": "1"}, {"error": {"code": "rate_limited", "message": "slow down"}}),
        (503, {"Retry-After": "1"}, {"error": {"code": "database_unavailable", "message": "database down"}}),
        (200, {}, TRAINING),
        (200, {}, done),
    ]
    result = krona("trainings", "wait", TRAINING["id"], "--url", api.url, "--api-key", "k")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded" and "adapter adp_1" in result.stderr
    assert api.requests.count(("GET", path)) >= 4  # the 429 and the 503 were waited out, not fatal
    api.routes[("GET", path)] = [(200, {}, {**done, "status": "failed", "error": {"code": "x", "message": "boom"}})]
    failed = krona("trainings", "wait", TRAINING["id"], "--url", api.url, "--api-key", "k")
    assert failed.returncode == 1 and "failed" in failed.stderr and "x: boom" in failed.stderr


def test_ctrl_c_while_waiting_says_how_to_wait_again(api):
    api.routes[("GET", f"/v1/trainings/{TRAINING['id']}/events")] = [(200, {}, "SSE-HOLD")]
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "trainings", "wait", TRAINING["id"], "--url", api.url,
         "--api-key", "k"],
        cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    shown = process.stderr.readline()  # the training's state, once the stream delivered it
    assert "training" in shown and "3/40 steps" in shown and "ETA" in shown, shown
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert f"krona trainings wait {TRAINING['id']}" in err and "goes on" in err and "Traceback" not in err
