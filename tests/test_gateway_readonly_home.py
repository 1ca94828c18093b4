"""The gateway builds its app and answers creates with no writable home directory and no model cache.

Its container runs as uid 10001 with a root-owned HOME and, in Kubernetes, a read-only root filesystem: it
must never download or build a model. Here HOME, XDG_CACHE_HOME, KRONA_MODEL_CACHE and KRONA_DATA_DIR are
paths under /proc (missing, and not creatable even by root), the Hub is off (HF_HUB_OFFLINE=1), and
HF_HOME is a cache that holds one custom model's unet/config.json and must come out unchanged. Storage is
S3 (SeaweedFS), the database PostgreSQL, the broker Redis: nothing local is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from shared.models.reference import REFERENCE_UNET_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/proc/krona-test-missing"
MODELS = ("tiny-sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
          "acme/custom-sd")  # fmt: skip

SCRIPT = """
import io, json, os, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from services.gateway.app import create_app
from shared.settings import Settings

def png(seed):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()

headers = {"Authorization": "Bearer " + os.environ["TEST_API_KEY"]}
out = {}
for model in json.loads(os.environ["TEST_MODELS"]):
    app = create_app(Settings(base_model=model))
    with TestClient(app) as client:
        files = [("images", (f"img{i}.png", png(i), "image/png")) for i in range(2)]
        data = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 10}'}
        training = client.post("/v1/trainings", headers=headers, data=data, files=files)
        generation = client.post("/v1/generations", headers=headers, json={"prompt": "a dog", "steps": 2})
        out[model] = {"training": [training.status_code, training.json()], "generation": [generation.status_code,
                      generation.json()], "native_size": app.state.context.native_size()}
out["heavy"] = sorted({"torch", "diffusers", "transformers"} & set(sys.modules))
print(json.dumps(out))
"""


def _prefilled_hf_home(root: Path) -> Path:
    """A Hugging Face cache holding only acme/custom-sd's unet/config.json (as a worker's download leaves it)."""
    commit = "0" * 40
    repo = root / "hub" / "models--acme--custom-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    config = {**REFERENCE_UNET_CONFIGS["sd15"], "sample_size": 80, "_class_name": "UNet2DConditionModel"}
    (repo / "snapshots" / commit / "unet").mkdir(parents=True)
    (repo / "snapshots" / commit / "unet" / "config.json").write_text(json.dumps(config))
    return root


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def test_gateway_answers_creates_with_no_writable_home_or_model_cache(
    postgres_url, redis_url, s3_server, s3_storage, tmp_path
):
    from shared.db import make_engine, make_session_factory
    from shared.tenants import create_tenant

    sessions = make_session_factory(make_engine(postgres_url))
    with sessions() as session:
        _, key = create_tenant(session, f"readonly-{uuid.uuid4().hex[:6]}")
        session.commit()
    hf_home = _prefilled_hf_home(tmp_path / "hf")
    before = _tree(hf_home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRONA_", "HF_", "XDG_", "HUGGINGFACE"))}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONDONTWRITEBYTECODE="1",
        HOME=f"{MISSING}/home",
        XDG_CACHE_HOME=f"{MISSING}/cache",
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        KRONA_MODEL_CACHE=f"{MISSING}/krona-models",
        KRONA_DATA_DIR=f"{MISSING}/data",
        KRONA_DATABASE_URL=postgres_url,
        # A database of the broker of its own: no stack test's worker is woken by these messages.
        KRONA_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/14",
        KRONA_S3_ENDPOINT=s3_storage.endpoint,
        KRONA_S3_BUCKET=s3_storage.bucket,
        KRONA_S3_ACCESS_KEY=s3_server["access_key"],
        KRONA_S3_SECRET_KEY=s3_server["secret_key"],
        TEST_API_KEY=key,
        TEST_MODELS=json.dumps(MODELS),
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    view = json.loads(result.stdout.strip().splitlines()[-1])
    for model in MODELS:
        assert view[model]["training"][0] == 202, (model, view[model]["training"])
        assert view[model]["generation"][0] == 202, (model, view[model]["generation"])
        assert view[model]["training"][1]["status"] == "queued"
    # Each base model's own image size: read from its config, none downloaded or built.
    assert view["tiny-sd"]["native_size"] == 64
    assert view["stable-diffusion-v1-5/stable-diffusion-v1-5"]["native_size"] == 512
    assert view["stabilityai/stable-diffusion-xl-base-1.0"]["native_size"] == 1024
    assert view["acme/custom-sd"]["native_size"] == 640  # from the cache, not a bundled config
    assert view["heavy"] == []
    assert _tree(hf_home) == before, "the gateway wrote into the Hugging Face cache"
    assert "PermissionError" not in result.stderr and "Read-only file system" not in result.stderr
    import redis

    redis.Redis.from_url(env["KRONA_BROKER_URL"]).flushdb()
