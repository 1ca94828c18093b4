"""Progress events of trainings: one poller per followed training per gateway process, fanned out to followers.

A follower never touches the database: each followed training has one asyncio task in this process
that reads the row (in the threadpool, with a short session) every ``interval`` seconds and
publishes a new snapshot when the status, step, loss, phase or queue position changed. Followers wait on that snapshot.
With N followers of one training the database sees one query per interval, not N, and the event
loop never blocks. The poller stops when its training is finished or nobody follows it any more.

A tenant may hold at most ``max_streams_per_tenant`` streams in one process (429 past that).

A stream ends when its training does, when the training's row is gone (``TrainingGone``: deleted, or its
tenant was), and when its follower may no longer see it (``FollowerRefused``: ``still_allowed``, checked every
``check_every`` seconds while nothing changes, says the key was revoked or its tenant deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from shared.db import TERMINAL_STATUSES

log = logging.getLogger("krona.gateway.events")

__all__ = ["FollowerRefused", "ProgressHub", "TooManyStreams", "TrainingGone"]


class TooManyStreams(Exception):
    """The tenant already holds its maximum of event streams in this process."""


class TrainingGone(Exception):
    """The followed training's row no longer exists (deleted, or its tenant was)."""


class FollowerRefused(Exception):
    """The follower's key no longer lets it see the training (revoked, or its tenant deleted)."""


# The snapshot a poller publishes when the row is gone.
_GONE: dict[str, Any] = {"status": "__gone__"}


@dataclass
class _Topic:
    snapshot: dict[str, Any] | None = None
    version: int = 0
    followers: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task | None = None


class ProgressHub:
    """Shared snapshots of followed trainings. ``load(training_id)`` returns the public body, or None when the row
    is gone (blocking is fine: it runs in the threadpool)."""

    def __init__(
        self, load: Callable[[str], dict[str, Any] | None], *, interval: float = 0.5, max_streams_per_tenant: int = 100
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

    async def follow(
        self,
        training_id: str,
        *,
        still_allowed: Callable[[], Awaitable[bool]] | None = None,
        check_every: float = 5.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Snapshots of the training as they change, ending after a terminal one; TrainingGone when its row is
        deleted, FollowerRefused when ``still_allowed()`` (awaited every ``check_every`` s without a change)
        answers False."""
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
                    changed = lambda seen=seen: topic.version != seen  # noqa: E731
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(topic.changed.wait_for(changed), timeout=check_every)
                    fresh = changed()
                    seen, snapshot = topic.version, topic.snapshot
                if not fresh:
                    if still_allowed is not None and not await still_allowed():
                        raise FollowerRefused(training_id)
                    continue
                if snapshot is _GONE:
                    raise TrainingGone(training_id)
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
                if body is None:  # the row is gone: every follower ends
                    async with topic.changed:
                        topic.snapshot, topic.version = _GONE, topic.version + 1
                        topic.changed.notify_all()
                    return
            except Exception as exc:  # a database blip: keep the followers, try again
                failures += 1
                if failures == 1:
                    log.warning("progress of %s unreadable (%s); retrying", training_id, exc.__class__.__name__)
                await asyncio.sleep(min(5.0, self.interval * 2**failures))
                continue
            progress = body["progress"]
            state = (
                body["status"],
                progress["step"],
                progress["loss"],
                progress.get("phase"),
                body.get("queue_position"),
            )
            if state != last:
                last = state
                async with topic.changed:
                    topic.snapshot, topic.version = body, topic.version + 1
                    topic.changed.notify_all()
            if body["status"] in TERMINAL_STATUSES:
                return
            await asyncio.sleep(self.interval)
