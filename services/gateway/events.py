"""Progress events of trainings: one poller per followed training per gateway process, fanned out to followers.

A follower never touches the database: each followed training has one asyncio task in this process
that reads the row (in the threadpool, with a short session) every ``interval`` seconds and
publishes a new snapshot when the status, step or loss changed. Followers wait on that snapshot.
With N followers of one training the database sees one query per interval, not N, and the event
loop never blocks. The poller stops when its training is finished or nobody follows it any more.

A tenant may hold at most ``max_streams_per_tenant`` streams in one process (429 past that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from shared.db import TERMINAL_STATUSES

log = logging.getLogger("krona.gateway.events")

__all__ = ["ProgressHub", "TooManyStreams"]


class TooManyStreams(Exception):
    """The tenant already holds its maximum of event streams in this process."""


@dataclass
class _Topic:
    snapshot: dict[str, Any] | None = None
    version: int = 0
    followers: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task | None = None


class ProgressHub:
    """Shared snapshots of followed trainings. ``load(training_id)`` returns the public body (blocking is fine)."""

    def __init__(
        self, load: Callable[[str], dict[str, Any]], *, interval: float = 0.5, max_streams_per_tenant: int = 100
    ) -> None:
        self._load = load
        self.interval = interval
        self.max_streams_per_tenant = max_streams_per_tenant
        self._topics: dict[str, _Topic] = {}
        self._streams: Counter[str] = Counter()

    def streams(self, tenant_id: str) -> int:
        return self._streams[tenant_id]

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        """Hold one of the tenant's stream slots; TooManyStreams when all are taken."""
        if self._streams[tenant_id] >= self.max_streams_per_tenant:
            raise TooManyStreams(tenant_id)
        self._streams[tenant_id] += 1
        try:
            yield
        finally:
            self._streams[tenant_id] -= 1
            if self._streams[tenant_id] <= 0:
                del self._streams[tenant_id]

    async def follow(self, training_id: str) -> AsyncIterator[dict[str, Any]]:
        """Snapshots of the training as they change, ending after a terminal one."""
        topic = self._topics.get(training_id)
        if topic is None:
            topic = self._topics[training_id] = _Topic()
        topic.followers += 1
        if topic.task is None or topic.task.done():
            topic.task = asyncio.create_task(self._poll(training_id, topic), name=f"progress-{training_id}")
        seen = 0
        try:
            while True:
                async with topic.changed:
                    await topic.changed.wait_for(lambda seen=seen: topic.version != seen)
                    seen, snapshot = topic.version, topic.snapshot
                yield snapshot
                if snapshot["status"] in TERMINAL_STATUSES:
                    return
        finally:
            topic.followers -= 1
            if topic.followers == 0:
                if topic.task is not None:
                    topic.task.cancel()
                if self._topics.get(training_id) is topic:
                    del self._topics[training_id]

    async def _poll(self, training_id: str, topic: _Topic) -> None:
        last = None
        failures = 0
        while True:
            try:
                body = await run_in_threadpool(self._load, training_id)
                failures = 0
            except Exception as exc:  # a database blip: keep the followers, try again
                failures += 1
                if failures == 1:
                    log.warning("progress of %s unreadable (%s); retrying", training_id, exc.__class__.__name__)
                await asyncio.sleep(min(5.0, self.interval * 2**failures))
                continue
            state = (body["status"], body["progress"]["step"], body["progress"]["loss"])
            if state != last:
                last = state
                async with topic.changed:
                    topic.snapshot, topic.version = body, topic.version + 1
                    topic.changed.notify_all()
            if body["status"] in TERMINAL_STATUSES:
                return
            await asyncio.sleep(self.interval)
