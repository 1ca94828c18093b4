"""A client generated from /openapi.json by an outside generator (openapi-python-client) runs the main flow.

Generated in the test from the live document of `krona up`, so the document itself is what is tested.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers.api import png


def _generate(base: str, folder: Path):
    document = folder / "openapi.json"
    document.write_bytes(httpx.get(f"{base}/openapi.json", timeout=10).content)
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(document), "--output-path",
         str(folder / "krona_generated"), "--meta", "none"],
        cwd=folder, capture_output=True, text=True, timeout=300,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(folder)},
    )  # fmt: skip
    assert (folder / "krona_generated" / "client.py").exists(), result.stdout + result.stderr
    # The document generates cleanly: no endpoint or type the generator had to skip or guess at.
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    sys.path.insert(0, str(folder))
    return importlib.import_module("krona_generated")


def _until(call, done, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        value = call()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_generated_client_runs_the_main_flow(embedded_stack, tmp_path):
    base, key = embedded_stack
    package = _generate(base, tmp_path)
    try:
        from krona_generated.api.adapters import download_adapter_file, list_adapters
        from krona_generated.api.generations import create_generation, get_generation, get_generation_image
        from krona_generated.api.trainings import create_training, get_training
        from krona_generated.models import BodyCreateTraining, ErrorResponse, GenerationCreate, TrainingParams
        from krona_generated.types import File

        client = package.AuthenticatedClient(base_url=base, token=key, timeout=httpx.Timeout(60))
        images = [File(payload=io.BytesIO(png(i)), file_name=f"{i}.png", mime_type="image/png") for i in range(2)]
        # params is a typed object (a JSON part of the multipart body), not a string
        body = BodyCreateTraining(
            images=images, instance_prompt="a photo of sks dog", params=TrainingParams(steps=2, gradient_accumulation=1)
        )
        training = create_training.sync(client=client, body=body)
        assert not isinstance(training, ErrorResponse), training.error
        assert training.id.startswith("trn_")
        done = _until(
            lambda: get_training.sync(training.id, client=client), lambda t: t.status in ("succeeded", "failed")
        )
        assert done.status == "succeeded", done
        adapters = list_adapters.sync(client=client)
        assert [a.id for a in adapters.data] == [done.adapter_id]
        request = GenerationCreate(
            prompt="a photo of sks dog", adapter_id=done.adapter_id, steps=2, width=64, height=64
        )
        generation = create_generation.sync(client=client, body=request)
        finished = _until(
            lambda: get_generation.sync(generation.id, client=client), lambda g: g.status in ("succeeded", "failed")
        )
        assert finished.status == "succeeded", finished
        image = get_generation_image.sync_detailed(generation.id, 0, client=client)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        # Downloads parse as files (binary responses are declared as such).
        parsed = get_generation_image.sync(generation.id, 0, client=client)
        assert isinstance(parsed, File) and parsed.payload.read().startswith(b"\x89PNG")
        adapter_file = download_adapter_file.sync(done.adapter_id, client=client)
        assert isinstance(adapter_file, File) and len(adapter_file.payload.read()) > 1000
        missing = get_training.sync("trn_000000000000000000000000", client=client)
        assert isinstance(missing, ErrorResponse) and missing.error.code == "training_not_found"
        anonymous = package.Client(base_url=base)
        refused = list_adapters.sync(client=anonymous)
        assert isinstance(refused, ErrorResponse) and refused.error.code == "unauthorized"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "krona_generated" or m.startswith("krona_generated.")]:
            del sys.modules[name]
