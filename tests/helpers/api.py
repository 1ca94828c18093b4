"""Helpers for the HTTP API tests: the client wrapper with two tenants, a recording broker, images, adapter files."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


class RecordingEnqueuer:
    """Stands in for the broker in API tests (the end-to-end tests use the real one)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, task: str, job_id: str) -> None:
        self.sent.append((task, job_id))

    def send_many(self, task: str, job_ids: list[str]) -> int:
        for job_id in job_ids:
            self.send(task, job_id)
        return len(job_ids)

    def check(self) -> None:
        return None


def png(seed: int = 0, size: tuple[int, int] = (96, 80), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def image_files(count: int = 2) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"img{i}.png", png(i), "image/png")) for i in range(count)]


@dataclass
class Api:
    client: object
    context: object
    enqueuer: RecordingEnqueuer
    keys: dict[str, str] = field(default_factory=dict)

    def headers(self, tenant: str = "acme", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}", **extra}


def wait_for(client, path, headers, until, timeout=240):
    """GET ``path`` every 0.5 s until ``until(body)``. Waits on progress, not on a budget for an idle machine: it
    fails only when the body stayed the same for ``timeout`` seconds (a stuck job), or after 10 x ``timeout`` in
    all; a loaded machine that is slow but moving (steps, loss, status, phase changing) is waited for."""
    import time

    started = last_change = time.monotonic()
    body = previous = None
    while time.monotonic() - last_change < timeout and time.monotonic() - started < 10 * timeout:
        body = client.get(path, headers=headers).json()
        if until(body):
            return body
        if body != previous:
            previous, last_change = body, time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"no progress for {timeout} s (or over {10 * timeout} s in all) on {path}: {body}")


def native_adapter_file(a1=64, a2=8, seed=0) -> bytes:
    """A native adapter file for tiny-sd with random factors (B small), as a trainer would write it."""
    from shared.krona.config import KronaConfig
    from shared.krona.convert import adapter_bytes
    from shared.models import unet_config
    from shared.models.shapes import attention_projection_shapes

    shapes = attention_projection_shapes(unet_config("tiny-sd"))
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, (d_out, d_in) in shapes.items():
        arrays[path + ".krona_a"] = rng.standard_normal((a1, a2)).astype(np.float32)
        arrays[path + ".krona_b"] = rng.standard_normal((d_out // a1, d_in // a2)).astype(np.float32) * 0.01
    return adapter_bytes(arrays, KronaConfig(a1=a1, a2=a2), {"base_model": "tiny-sd"})


def tenant_of(api, name: str = "acme"):
    from shared.tenants import tenant_for_key

    with api.context.sessions() as session:
        tenant = tenant_for_key(session, api.keys[name])
        session.expunge(tenant)
        return tenant


def set_tenant_limits(api, name: str = "acme", weight: float | None = None, **limits) -> str:
    """Write a tenant's limit overrides (and weight) straight into its row; its id."""
    from sqlalchemy import update

    from shared.db import Tenant

    tenant = tenant_of(api, name)
    values = {"limits": limits} | ({"weight": weight} if weight is not None else {})
    with api.context.sessions() as session:
        session.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values))
        session.commit()
    return tenant.id


def running_training(sessions, key: str) -> str:
    """A running training of the key's tenant (no worker: its row only); its id."""
    from shared.db import Training, utcnow
    from shared.tenants import tenant_for_key

    with sessions() as session:
        tenant = tenant_for_key(session, key)
        row = Training(
            tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="p", status="running", image_keys=["a", "b"],
            total_steps=10, started_at=utcnow(),
        )  # fmt: skip
        session.add(row)
        session.commit()
        return row.id
