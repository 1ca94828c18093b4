"""``krona_sdk.AsyncClient``: the same API as ``Client`` for asyncio (``await`` each call; ``async for`` lists and
events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from . import _calls as calls
from ._base import Backoff, BaseClient, Call
from ._client import (
    FINAL_ERRORS,
    STREAM_READ_TIMEOUT,
    _check_succeeded,
    _deadline,
    _decode_images,
    _Follower,
    _timed_out,
)
from ._files import FileInput, ImagesInput
from ._sse import SSEDecoder
from .errors import APIConnectionError, KronaError, RateLimited, ServiceUnavailable, WaitTimeoutError
from .models import (
    Adapter,
    ApiKey,
    Batch,
    Capabilities,
    Generation,
    Page,
    Tenant,
    TenantCreated,
    Training,
    TrainingEvent,
    Usage,
    WebhookSecret,
)

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["AsyncClient"]

log = logging.getLogger("krona_sdk")


class _Resource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def _call(self, call: Call) -> Any:
        return await self._client._call(call)

    async def _poll(
        self,
        get: Callable[[], Awaitable[Any]],
        follower: _Follower,
        deadline: float | None,
        what: str,
        backoff: Backoff,
        done: Callable[[Any], bool] = lambda resource: resource.done,
    ) -> Any:
        failures = 0
        while True:
            try:
                resource = await get()
            except (RateLimited, ServiceUnavailable) as exc:
                delay = exc.retry_after if exc.retry_after is not None else backoff.next()
            except APIConnectionError:
                failures += 1
                if failures > self._client.max_retries:
                    raise
                delay = backoff.next()
            else:
                failures = 0
                follower(resource)
                if done(resource):
                    return resource
                delay = backoff.next()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise _timed_out(deadline, follower, what)
            await self._client._sleep(delay)


class AsyncTrainings(_Resource):
    async def create(
        self,
        images: ImagesInput,
        instance_prompt: str,
        params: Mapping[str, Any] | str | None = None,
        name: str | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        on_progress: Callable[[Training], Any] | None = None,
        timeout: float | None = None,
    ) -> Training:
        call = calls.create_training(images, instance_prompt, params, name, webhook_url, idempotency_key)
        training = await self._call(call)
        if wait:
            return await self.wait(training.id, on_progress=on_progress, timeout=timeout)
        return training

    async def get(self, training_id: str) -> Training:
        return await self._call(calls.get_training(training_id))

    async def list_page(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[Training]:
        return await self._call(calls.list_trainings(status, limit, cursor))

    def list(self, status: str | None = None, limit: int | None = None) -> AsyncIterator[Training]:
        return self._client._paginate(lambda cursor: calls.list_trainings(status, limit, cursor))

    async def cancel(self, training_id: str) -> Training:
        return await self._call(calls.cancel_training(training_id))

    async def delete(self, training_id: str) -> None:
        await self._call(calls.delete_training(training_id))

    async def events(
        self, training_id: str, *, read_timeout: float = STREAM_READ_TIMEOUT
    ) -> AsyncIterator[TrainingEvent]:
        path = calls.training_events_path(training_id)
        async with self._client._stream(path, read_timeout) as response:
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                sse = decoder.feed(line)
                if sse is None or sse.event not in ("progress", "done"):
                    continue
                event = TrainingEvent(event=sse.event, training=Training.model_validate_json(sse.data))
                yield event
                if event.event == "done" or event.training.done:
                    return

    async def wait(
        self, training_id: str, on_progress: Callable[[Training], Any] | None = None, timeout: float | None = None
    ) -> Training:
        deadline = _deadline(timeout)
        follower = _Follower(on_progress)
        what = f"training {training_id}"
        try:
            read_timeout = STREAM_READ_TIMEOUT if deadline is None else max(0.1, min(STREAM_READ_TIMEOUT, timeout))
            async for event in self.events(training_id, read_timeout=read_timeout):
                follower(event.training)
                if event.training.done:
                    return event.training
                if deadline is not None and time.monotonic() > deadline:
                    raise _timed_out(deadline, follower, what)
        except FINAL_ERRORS:
            raise
        except (KronaError, httpx.HTTPError, ValueError) as exc:
            if isinstance(exc, WaitTimeoutError):
                raise
            log.info("event stream of %s unavailable (%s); polling", training_id, exc)
        return await self._poll(lambda: self.get(training_id), follower, deadline, what, Backoff(0.5, 1.5, 5.0))


class AsyncAdapters(_Resource):
    async def get(self, adapter_id: str) -> Adapter:
        return await self._call(calls.get_adapter(adapter_id))

    async def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Adapter]:
        return await self._call(calls.list_adapters(limit, cursor))

    def list(self, limit: int | None = None) -> AsyncIterator[Adapter]:
        return self._client._paginate(lambda cursor: calls.list_adapters(limit, cursor))

    async def delete(self, adapter_id: str) -> None:
        await self._call(calls.delete_adapter(adapter_id))

    async def upload(self, file: FileInput, name: str | None = None, base_model: str | None = None) -> Adapter:
        return await self._call(calls.upload_adapter(file, name, base_model))

    async def download(self, adapter_id: str, format: str = "krona", path: str | Path | None = None) -> bytes | Path:
        data = await self._call(calls.download_adapter(adapter_id, format))
        if path is None:
            return data
        target = Path(path)
        if target.is_dir():
            target = target / f"{adapter_id}.{format}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    async def evaluate(
        self, adapter_id: str, images: ImagesInput, params: Mapping[str, Any] | str | None = None
    ) -> Adapter:
        return await self._call(calls.evaluate_adapter(adapter_id, images, params))

    async def wait_evaluation(
        self, adapter_id: str, on_progress: Callable[[Adapter], Any] | None = None, timeout: float | None = None
    ) -> Adapter:
        def finished(adapter: Adapter) -> bool:
            return adapter.evaluation is None or adapter.evaluation.status in ("succeeded", "failed")

        return await self._poll(
            lambda: self.get(adapter_id), _Follower(on_progress), _deadline(timeout),
            f"the evaluation of {adapter_id}", Backoff(1.0, 1.5, 5.0), finished,
        )  # fmt: skip


class AsyncGenerations(_Resource):
    async def create(
        self,
        prompt: str,
        *,
        adapter_id: str | None = None,
        adapter_scale: float | None = None,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        on_progress: Callable[[Generation], Any] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        fields = {
            "adapter_id": adapter_id, "adapter_scale": adapter_scale, "negative_prompt": negative_prompt,
            "num_images": num_images, "steps": steps, "guidance_scale": guidance_scale, "width": width,
            "height": height, "seed": seed, "webhook_url": webhook_url,
        }  # fmt: skip
        generation = await self._call(calls.create_generation(prompt, fields, idempotency_key))
        if wait:
            return await self.wait(generation.id, on_progress=on_progress, timeout=timeout)
        return generation

    async def get(self, generation_id: str) -> Generation:
        return await self._call(calls.get_generation(generation_id))

    async def list_page(
        self,
        status: str | None = None,
        adapter_id: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Generation]:
        return await self._call(calls.list_generations(status, adapter_id, batch_id, limit, cursor))

    def list(
        self,
        status: str | None = None,
        adapter_id: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Generation]:
        return self._client._paginate(
            lambda cursor: calls.list_generations(status, adapter_id, batch_id, limit, cursor)
        )

    async def delete(self, generation_id: str) -> None:
        await self._call(calls.delete_generation(generation_id))

    async def cancel(self, generation_id: str) -> Generation:
        return await self._call(calls.cancel_generation(generation_id))

    async def wait(
        self, generation_id: str, on_progress: Callable[[Generation], Any] | None = None, timeout: float | None = None
    ) -> Generation:
        return await self._poll(
            lambda: self.get(generation_id), _Follower(on_progress), _deadline(timeout),
            f"generation {generation_id}", Backoff(0.25, 1.5, 2.0),
        )  # fmt: skip

    async def image_bytes(self, generation_id: str, index: int) -> bytes:
        return await self._call(calls.generation_image(generation_id, index))

    async def images(self, generation_id: str) -> list[Image]:
        generation = await self.get(generation_id)
        _check_succeeded(generation)
        return _decode_images([await self.image_bytes(generation.id, image.index) for image in generation.images])

    async def download(self, generation_id: str, directory: str | Path) -> list[Path]:
        generation = await self.get(generation_id)
        _check_succeeded(generation)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in generation.images:
            path = folder / f"{generation.id}-{image.index}.png"
            path.write_bytes(await self.image_bytes(generation.id, image.index))
            paths.append(path)
        return paths


class AsyncBatches(_Resource):
    async def create(
        self,
        generations: Iterable[Mapping[str, Any]],
        wait: bool = False,
        idempotency_key: str | None = None,
        on_progress: Callable[[Batch], Any] | None = None,
        timeout: float | None = None,
    ) -> Batch:
        batch = await self._call(calls.create_batch(generations, idempotency_key))
        if wait:
            return await self.wait(batch.id, on_progress=on_progress, timeout=timeout)
        return batch

    async def get(self, batch_id: str) -> Batch:
        return await self._call(calls.get_batch(batch_id))

    async def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Batch]:
        return await self._call(calls.list_batches(limit, cursor))

    def list(self, limit: int | None = None) -> AsyncIterator[Batch]:
        return self._client._paginate(lambda cursor: calls.list_batches(limit, cursor))

    async def cancel(self, batch_id: str) -> Batch:
        return await self._call(calls.cancel_batch(batch_id))

    async def wait(
        self, batch_id: str, on_progress: Callable[[Batch], Any] | None = None, timeout: float | None = None
    ) -> Batch:
        return await self._poll(
            lambda: self.get(batch_id), _Follower(on_progress), _deadline(timeout), f"batch {batch_id}",
            Backoff(0.5, 1.5, 5.0),
        )  # fmt: skip


class AsyncApiKeys(_Resource):
    async def create(self, name: str | None = None) -> ApiKey:
        return await self._call(calls.create_api_key(name))

    async def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[ApiKey]:
        return await self._call(calls.list_api_keys(limit, cursor))

    def list(self, limit: int | None = None) -> AsyncIterator[ApiKey]:
        return self._client._paginate(lambda cursor: calls.list_api_keys(limit, cursor))

    async def revoke(self, key_id: str) -> None:
        await self._call(calls.revoke_api_key(key_id))


class AsyncWebhookSecrets(_Resource):
    async def rotate(self) -> WebhookSecret:
        return await self._call(calls.rotate_webhook_secret())


class AsyncTenants(_Resource):
    async def create(
        self, name: str, weight: float | None = None, limits: Mapping[str, Any] | None = None
    ) -> TenantCreated:
        return await self._call(calls.create_tenant(name, weight, limits))

    async def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Tenant]:
        return await self._call(calls.list_tenants(limit, cursor))

    def list(self, limit: int | None = None) -> AsyncIterator[Tenant]:
        return self._client._paginate(lambda cursor: calls.list_tenants(limit, cursor))

    async def get(self, tenant_id: str) -> Tenant:
        return await self._call(calls.get_tenant(tenant_id))

    async def update(
        self,
        tenant_id: str,
        weight: float | None = None,
        limits: Mapping[str, Any] | None = None,
        clear: Iterable[str] = (),
    ) -> Tenant:
        return await self._call(calls.update_tenant(tenant_id, weight, limits, clear))

    async def delete(self, tenant_id: str) -> None:
        await self._call(calls.delete_tenant(tenant_id))


class AsyncClient(BaseClient):
    """The Krona API for asyncio: the methods of ``Client``, awaited; lists and events are async iterators.

    >>> async with krona_sdk.AsyncClient() as client:
    ...     training = await client.trainings.create(images="photos/", instance_prompt="a photo of sks dog", wait=True)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        *,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, headers)
        if http_client is None:
            http_client = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=True)
        http_client.base_url = httpx.URL(self.base_url)
        http_client.headers.update(self._headers)
        self._http = http_client
        self.trainings = AsyncTrainings(self)
        self.adapters = AsyncAdapters(self)
        self.generations = AsyncGenerations(self)
        self.batches = AsyncBatches(self)
        self.api_keys = AsyncApiKeys(self)
        self.webhook_secret = AsyncWebhookSecrets(self)
        self.tenants = AsyncTenants(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _send(self, call: Call) -> httpx.Response:
        kwargs = self._request_kwargs(call)
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **kwargs)
            except httpx.TransportError as exc:
                delay = self._retry_delay(call, attempt, exc=exc)
                if delay is None:
                    raise self._transport_error(exc) from exc
                self._log_retry(call, delay, attempt, exc.__class__.__name__)
            else:
                if response.is_success:
                    return response
                delay = self._retry_delay(call, attempt, response=response)
                if delay is None:
                    raise self._error(response)
                self._log_retry(call, delay, attempt, f"HTTP {response.status_code}")
            await self._sleep(delay)
            attempt += 1

    async def _call(self, call: Call) -> Any:
        return self._parse(call, await self._send(call))

    async def _paginate(self, build: Callable[[str | None], Call]) -> AsyncIterator[Any]:
        cursor = None
        while True:
            page = await self._call(build(cursor))
            for item in page.data:
                yield item
            cursor = page.next_cursor
            if not cursor:
                return

    @contextlib.asynccontextmanager
    async def _stream(self, path: str, read_timeout: float) -> AsyncIterator[httpx.Response]:
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            async with self._http.stream(
                "GET", path, headers={"Accept": "text/event-stream"}, timeout=timeout
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise self._error(response)
                yield response
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    async def generate(self, prompt: str, *, timeout: float | None = None, **fields: Any) -> list[Image]:
        generation = await self.generations.create(prompt, wait=True, timeout=timeout, **fields)
        _check_succeeded(generation)
        blobs = [await self.generations.image_bytes(generation.id, i.index) for i in generation.images]
        return _decode_images(blobs)

    async def usage(self, start: str | None = None, end: str | None = None, granularity: str = "day") -> Usage:
        return await self._call(calls.usage(start, end, granularity))

    async def capabilities(self) -> Capabilities:
        return await self._call(calls.capabilities())

    async def ready(self) -> dict[str, Any]:
        return await self._call(calls.readiness())
