"""A generation job: claim the row, load the adapter (if any) into the worker's pipeline, render, store PNGs."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

from sqlalchemy import select

from shared.db import Adapter, Generation

from ..lease import claim, finish, renew
from ..runtime import Runtime

log = logging.getLogger("krona.worker.inference")

__all__ = ["run_generation_job"]


def _pipeline(rt: Runtime):
    import torch

    from shared.models import load_pipeline

    key = f"infer:{rt.settings.base_model}"
    if key not in rt.pipelines:
        device = rt.settings.worker_device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else None
        pipe = load_pipeline(rt.settings.base_model, torch_dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        rt.pipelines[key] = pipe
    return rt.pipelines[key]


def run_generation_job(rt: Runtime, generation_id: str) -> str:
    import numpy as np
    import torch
    from PIL import Image

    from shared.krona import delete_adapter, krona_layers, load_into_pipeline

    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        if not claim(session, Generation, generation_id, rt.owner, lease):
            return "skipped"
        row = session.get(Generation, generation_id)
        job = {
            c: getattr(row, c)
            for c in (
                "tenant_id",
                "prompt",
                "negative_prompt",
                "adapter_id",
                "adapter_scale",
                "num_images",
                "steps",
                "guidance_scale",
                "width",
                "height",
                "seed",
            )
        }
        adapter_key = None
        if job["adapter_id"]:
            adapter_key = session.scalar(
                select(Adapter.storage_key).where(
                    Adapter.id == job["adapter_id"], Adapter.tenant_id == job["tenant_id"]
                )
            )

    def fail(code: str, message: str) -> str:
        with rt.sessions() as session:
            finish(
                session, Generation, generation_id, rt.owner, "failed", error_code=code, error_message=message[:2000]
            )
        _notify(rt, generation_id)
        return "failed"

    if job["adapter_id"] and adapter_key is None:
        return fail("adapter_not_found", f"adapter {job['adapter_id']} was deleted")
    pipe = _pipeline(rt)
    try:
        if any("default" in layer.krona_a for layer in krona_layers(pipe.unet).values()):
            delete_adapter(pipe.unet, "default")
        if adapter_key:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "adapter.safetensors"
                path.write_bytes(rt.storage.get_bytes(adapter_key))
                load_into_pipeline(pipe, path, scale=job["adapter_scale"])
        generators = [torch.Generator().manual_seed(job["seed"] + i) for i in range(job["num_images"])]
        output = pipe(
            job["prompt"],
            negative_prompt=job["negative_prompt"],
            num_images_per_prompt=job["num_images"],
            num_inference_steps=job["steps"],
            guidance_scale=job["guidance_scale"],
            width=job["width"],
            height=job["height"],
            generator=generators,
            output_type="np",
        ).images
    except (ValueError, RuntimeError) as exc:
        return fail("generation_failed", str(exc))
    finally:
        if any("default" in layer.krona_a for layer in krona_layers(pipe.unet).values()):
            delete_adapter(pipe.unet, "default")
    images = []
    for index, array in enumerate(output):
        buffer = io.BytesIO()
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        key = f"tenants/{job['tenant_id']}/generations/{generation_id}/{index}.png"
        rt.storage.put_bytes(key, buffer.getvalue(), content_type="image/png")
        images.append({"index": index, "key": key, "seed": job["seed"] + index})
    with rt.sessions() as session:
        if not renew(session, Generation, generation_id, rt.owner, lease):
            return "lease_lost"
        finish(session, Generation, generation_id, rt.owner, "succeeded", images=images)
    _notify(rt, generation_id)
    return "succeeded"


def _notify(rt: Runtime, generation_id: str) -> None:
    from shared.queue import WEBHOOK_TASK

    with rt.sessions() as session:
        url = session.scalar(select(Generation.webhook_url).where(Generation.id == generation_id))
    if url:
        try:
            rt.send(WEBHOOK_TASK, f"generation:{generation_id}")
        except Exception:
            log.warning("could not enqueue the webhook of %s; the reaper will", generation_id)
