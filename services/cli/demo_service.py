"""`krona demo` (the default): the whole service on one machine, with no servers and no GPU.

Starts the embedded stack (`krona up`: gateway + worker, SQLite, local blobs, tiny-sd) in a fresh data
folder, makes a few subject images, submits a training over HTTP and follows its progress, generates
two images with the adapter, saves them, downloads the adapter in both formats, prints where
everything is, and stops the stack. The tiny model has random weights: the images are noise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.cli.progress import wait_generation, wait_training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subject_images(folder: Path) -> None:
    """Three views of a 'toy': a coloured square on a plain background, shifted a little."""
    # lazy: loads PIL
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image = Image.new("RGB", (128, 128), (40 + 30 * i, 90, 160))
        ImageDraw.Draw(image).rectangle([30 + 8 * i, 30, 90 + 8 * i, 95], fill=(220, 60, 40))
        image.save(folder / f"toy-{i}.png")


def run_service_demo(out: Path) -> None:
    # lazy: loads krona_sdk, pydantic
    import krona_sdk

    out = out.resolve()
    data_dir = out / "krona-data"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "KRONA_DATA_DIR": str(data_dir)}
    for name in ("KRONA_DATABASE_URL", "KRONA_BROKER_URL", "KRONA_S3_ENDPOINT"):
        env.pop(name, None)  # the demo is the embedded default, whatever this shell points at
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "stack.log"
    print(f"[1/6] starting the embedded stack on {url} (log: {log_path})", flush=True)
    log = open(log_path, "wb")  # noqa: SIM115
    stack = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if stack.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start; see {log_path}")
            time.sleep(0.5)
        key = (data_dir / "api-key").read_text().strip()
        images = out / "subject"
        _subject_images(images)
        params = {"steps": 40, "gradient_accumulation": 1, "learning_rate": 1e-2}
        with krona_sdk.Client(url, key) as client:
            training = client.trainings.create(
                images=images, instance_prompt="a photo of sks toy", params=params, name="demo"
            )
            print(f"[2/6] training {training.id} queued: 3 images, {params['steps']} steps", flush=True)
            training = wait_training(client, training.id)
            if training.status != "succeeded":
                raise RuntimeError(f"training ended {training.status}: {training.error}")
            adapter_id = training.adapter_id
            print(f"[3/6] training succeeded, loss {training.progress.loss:.4f}; adapter {adapter_id}", flush=True)
            generation = client.generations.create(
                "a photo of sks toy on the moon", adapter_id=adapter_id, num_images=2, steps=10, seed=7
            )
            generation = wait_generation(client, generation.id)
            if generation.status != "succeeded":
                raise RuntimeError(f"generation ended {generation.status}: {generation.error}")
            saved = []
            for image in generation.images:
                path = out / f"generated-{image.index}.png"
                path.write_bytes(client.generations.image_bytes(generation.id, image.index))
                saved.append(path)
            print(f"[4/6] generated {len(saved)} images: {', '.join(str(p) for p in saved)}", flush=True)
            for fmt in ("krona", "lycoris"):
                client.adapters.download(adapter_id, format=fmt, path=out / f"adapter.{fmt}.safetensors")
        print(f"[5/6] adapter saved as {out / 'adapter.krona.safetensors'} and {out / 'adapter.lycoris.safetensors'}")
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
        log.close()
    print(f"[6/6] stack stopped. The tiny model has random weights, so the images are noise. Files in {out}")
