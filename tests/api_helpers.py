"""Helpers for the HTTP API tests: an app on the session's PostgreSQL with two tenants."""

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
