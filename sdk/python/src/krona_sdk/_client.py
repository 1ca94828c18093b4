"""``krona_sdk.Client``: the synchronous client."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from . import _calls as calls
from ._base import Backoff, BaseClient, Call
from ._files import FileInput, ImagesInput
from ._sse import SSEDecoder
from .errors import (
    APIConnectionError,
    AuthenticationError,
    JobFailedError,
    KronaError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    WaitTimeoutError,
)
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

__all__ = ["Client"]

log = logging.getLogger("krona_sdk")
# How long an event stream may stay silent: the server sends a comment every 15 s.
STREAM_READ_TIMEOUT = 45.0
# Answers that end an event stream for good (polling would get them too).
FINAL_ERRORS = (AuthenticationError, PermissionDenied, NotFound)


def progress_key(resource: Any) -> tuple:
    """What a follower wants to hear about when it changes."""
    if isinstance(resource, Training):
        p = resource.progress
        return resource.status, resource.phase, p.step, p.total_steps, p.loss, resource.position
    if isinstance(resource, Batch):
        return tuple(sorted(resource.counts.items()))
    if isinstance(resource, Adapter):
        return (resource.evaluation.status if resource.evaluation else None,)
    return resource.status, getattr(resource, "phase", None), getattr(resource, "position", None)


class _Follower:
    """Calls ``on_progress`` with each new state; remembers the last one."""

    def __init__(self, on_progress: Callable[[Any], Any] | None) -> None:
        self.on_progress = on_progress
        self.last: Any = None
        self._key: tuple | None = None

    def __call__(self, resource: Any) -> None:
        self.last = resource
        key = progress_key(resource)
        if key != self._key:
            self._key = key
            if self.on_progress is not None:
                self.on_progress(resource)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _timed_out(deadline: float | None, follower: _Follower, what: str) -> WaitTimeoutError:
    state = getattr(follower.last, "status", "unknown")
    return WaitTimeoutError(
        f"stopped waiting for {what} (still {state}); it goes on on the server", resource=follower.last
    )


def _decode_images(blobs: list[bytes]) -> list[Image]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - the images extra
        raise ImportError("images as PIL images need pillow: pip install 'krona-sdk[images]'") from None
    images = []
    for blob in blobs:
        image = Image.open(io.BytesIO(blob))
        image.load()
        images.append(image)
    return images


def _check_succeeded(generation: Generation) -> None:
    if generation.status != "succeeded":
        if not generation.done:
            raise KronaError(f"generation {generation.id} is {generation.status}; wait for it first")
        error = generation.error
        detail = f": {error.code}: {error.message}" if error else ""
        raise JobFailedError(
            f"generation {generation.id} {generation.status}{detail}",
            resource=generation,
            code=error.code if error else None,
        )


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _call(self, call: Call) -> Any:
        return self._client._call(call)

    def _poll(
        self,
        get: Callable[[], Any],
        follower: _Follower,
        deadline: float | None,
        what: str,
        backoff: Backoff,
        done: Callable[[Any], bool] = lambda resource: resource.done,
    ) -> Any:
        """Call ``get`` until ``done``, sleeping with backoff; rides out 429/503 (after Retry-After) and up to
        ``max_retries`` failed polls in a row."""
        failures = 0
        while True:
            try:
                resource = get()
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
            self._client._sleep(delay)


class Trainings(_Resource):
    """``client.trainings``: fine-tunes of an adapter on photos of a subject."""

    def create(
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
        """Start a training on 2-20 photos: ``images`` is a folder, a glob, a list of paths, bytes or binary file
        objects; ``params`` a dict of the API's training parameters (``{"steps": 500, "learning_rate": 1e-3}``).
        With ``wait=True``, follows it to its end (see ``wait``) and returns the ended Training."""
        call = calls.create_training(images, instance_prompt, params, name, webhook_url, idempotency_key)
        training = self._call(call)
        if wait:
            return self.wait(training.id, on_progress=on_progress, timeout=timeout)
        return training

    def get(self, training_id: str) -> Training:
        return self._call(calls.get_training(training_id))

    def list_page(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[Training]:
        """One page, newest first; its ``next_cursor`` is the ``cursor`` of the next."""
        return self._call(calls.list_trainings(status, limit, cursor))

    def list(self, status: str | None = None, limit: int | None = None) -> Iterator[Training]:
        """Every training (of ``status``), newest first, fetching pages of ``limit`` (server default 20) as needed."""
        return self._client._paginate(lambda cursor: calls.list_trainings(status, limit, cursor))

    def cancel(self, training_id: str) -> Training:
        """A queued training is canceled at once, a running one at its next step (409 once it has ended)."""
        return self._call(calls.cancel_training(training_id))

    def delete(self, training_id: str) -> None:
        """Delete an ended training with its photos (409 while it runs); its adapter stays."""
        self._call(calls.delete_training(training_id))

    def events(self, training_id: str, *, read_timeout: float = STREAM_READ_TIMEOUT) -> Iterator[TrainingEvent]:
        """The training's server-sent events: ``progress`` on each change, then one ``done``."""
        path = calls.training_events_path(training_id)
        with self._client._stream(path, read_timeout) as response:
            decoder = SSEDecoder()
            for line in response.iter_lines():
                sse = decoder.feed(line)
                if sse is None or sse.event not in ("progress", "done"):
                    continue
                event = TrainingEvent(event=sse.event, training=Training.model_validate_json(sse.data))
                yield event
                if event.event == "done" or event.training.done:
                    return

    def wait(
        self, training_id: str, on_progress: Callable[[Training], Any] | None = None, timeout: float | None = None
    ) -> Training:
        """Follow the training until it ends and return it; ``on_progress(training)`` on every change.

        Follows the event stream; when the stream cannot be opened or breaks, polls with backoff (0.5 s growing
        to 5 s), waiting out 429 and 503 answers. ``timeout`` (seconds) raises WaitTimeoutError; the training
        goes on either way.
        """
        deadline = _deadline(timeout)
        follower = _Follower(on_progress)
        what = f"training {training_id}"
        try:
            read_timeout = STREAM_READ_TIMEOUT if deadline is None else max(0.1, min(STREAM_READ_TIMEOUT, timeout))
            for event in self.events(training_id, read_timeout=read_timeout):
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
        return self._poll(lambda: self.get(training_id), follower, deadline, what, Backoff(0.5, 1.5, 5.0))


class Adapters(_Resource):
    """``client.adapters``: trained or uploaded adapters."""

    def get(self, adapter_id: str) -> Adapter:
        return self._call(calls.get_adapter(adapter_id))

    def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Adapter]:
        return self._call(calls.list_adapters(limit, cursor))

    def list(self, limit: int | None = None) -> Iterator[Adapter]:
        return self._client._paginate(lambda cursor: calls.list_adapters(limit, cursor))

    def delete(self, adapter_id: str) -> None:
        self._call(calls.delete_adapter(adapter_id))

    def upload(self, file: FileInput, name: str | None = None, base_model: str | None = None) -> Adapter:
        """Upload a native Krona or LyCORIS LoKr safetensors file (a path, bytes or a binary file object)."""
        return self._call(calls.upload_adapter(file, name, base_model))

    def download(self, adapter_id: str, format: str = "krona", path: str | Path | None = None) -> bytes | Path:
        """The adapter file, ``krona`` (native) or ``lycoris`` (kohya LoKr keys): its bytes, or written to ``path``
        (a folder gets ``<id>.<format>.safetensors``) and the path returned."""
        data = self._call(calls.download_adapter(adapter_id, format))
        if path is None:
            return data
        target = Path(path)
        if target.is_dir():
            target = target / f"{adapter_id}.{format}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    def evaluate(self, adapter_id: str, images: ImagesInput, params: Mapping[str, Any] | str | None = None) -> Adapter:
        """Queue a score of the adapter (CLIP-I, CLIP-T, DINO) against 1-20 photos of its subject; ``params``:
        prompts, per_prompt, steps, class_noun, identifier. See ``wait_evaluation``."""
        return self._call(calls.evaluate_adapter(adapter_id, images, params))

    def wait_evaluation(
        self, adapter_id: str, on_progress: Callable[[Adapter], Any] | None = None, timeout: float | None = None
    ) -> Adapter:
        """Poll the adapter until its evaluation has succeeded or failed."""
        follower = _Follower(on_progress)

        def finished(adapter: Adapter) -> bool:
            return adapter.evaluation is None or adapter.evaluation.status in ("succeeded", "failed")

        return self._poll(
            lambda: self.get(adapter_id), follower, _deadline(timeout), f"the evaluation of {adapter_id}",
            Backoff(1.0, 1.5, 5.0), finished,
        )  # fmt: skip


class Generations(_Resource):
    """``client.generations``: image requests."""

    def create(
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
        generation = self._call(calls.create_generation(prompt, fields, idempotency_key))
        if wait:
            return self.wait(generation.id, on_progress=on_progress, timeout=timeout)
        return generation

    def get(self, generation_id: str) -> Generation:
        return self._call(calls.get_generation(generation_id))

    def list_page(
        self,
        status: str | None = None,
        adapter_id: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Generation]:
        return self._call(calls.list_generations(status, adapter_id, batch_id, limit, cursor))

    def list(
        self,
        status: str | None = None,
        adapter_id: str | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Generation]:
        return self._client._paginate(
            lambda cursor: calls.list_generations(status, adapter_id, batch_id, limit, cursor)
        )

    def delete(self, generation_id: str) -> None:
        self._call(calls.delete_generation(generation_id))

    def cancel(self, generation_id: str) -> Generation:
        return self._call(calls.cancel_generation(generation_id))

    def wait(
        self, generation_id: str, on_progress: Callable[[Generation], Any] | None = None, timeout: float | None = None
    ) -> Generation:
        """Poll until the generation ends (0.25 s growing to 2 s); waits out 429 and 503."""
        return self._poll(
            lambda: self.get(generation_id), _Follower(on_progress), _deadline(timeout),
            f"generation {generation_id}", Backoff(0.25, 1.5, 2.0),
        )  # fmt: skip

    def image_bytes(self, generation_id: str, index: int) -> bytes:
        """One image as PNG bytes."""
        return self._call(calls.generation_image(generation_id, index))

    def images(self, generation_id: str) -> list[Image]:
        """The generation's images as PIL images (needs the ``images`` extra); the generation must have
        succeeded."""
        generation = self.get(generation_id)
        _check_succeeded(generation)
        return _decode_images([self.image_bytes(generation.id, image.index) for image in generation.images])

    def download(self, generation_id: str, directory: str | Path) -> list[Path]:
        """Write the images as ``<directory>/<generation id>-<index>.png``; the paths."""
        generation = self.get(generation_id)
        _check_succeeded(generation)
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in generation.images:
            path = folder / f"{generation.id}-{image.index}.png"
            path.write_bytes(self.image_bytes(generation.id, image.index))
            paths.append(path)
        return paths


class Batches(_Resource):
    """``client.batches``: up to 1000 generations in one request."""

    def create(
        self,
        generations: Iterable[Mapping[str, Any]],
        wait: bool = False,
        idempotency_key: str | None = None,
        on_progress: Callable[[Batch], Any] | None = None,
        timeout: float | None = None,
    ) -> Batch:
        """``generations``: dicts with ``prompt`` and the fields of ``generations.create``."""
        batch = self._call(calls.create_batch(generations, idempotency_key))
        if wait:
            return self.wait(batch.id, on_progress=on_progress, timeout=timeout)
        return batch

    def get(self, batch_id: str) -> Batch:
        return self._call(calls.get_batch(batch_id))

    def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Batch]:
        return self._call(calls.list_batches(limit, cursor))

    def list(self, limit: int | None = None) -> Iterator[Batch]:
        return self._client._paginate(lambda cursor: calls.list_batches(limit, cursor))

    def cancel(self, batch_id: str) -> Batch:
        return self._call(calls.cancel_batch(batch_id))

    def wait(
        self, batch_id: str, on_progress: Callable[[Batch], Any] | None = None, timeout: float | None = None
    ) -> Batch:
        """Poll until no generation of the batch is queued or running (0.5 s growing to 5 s)."""
        return self._poll(
            lambda: self.get(batch_id), _Follower(on_progress), _deadline(timeout), f"batch {batch_id}",
            Backoff(0.5, 1.5, 5.0),
        )  # fmt: skip


class ApiKeys(_Resource):
    """``client.api_keys``: the tenant's own API keys."""

    def create(self, name: str | None = None) -> ApiKey:
        """A new key; ``.key`` holds it, in this answer only."""
        return self._call(calls.create_api_key(name))

    def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[ApiKey]:
        return self._call(calls.list_api_keys(limit, cursor))

    def list(self, limit: int | None = None) -> Iterator[ApiKey]:
        return self._client._paginate(lambda cursor: calls.list_api_keys(limit, cursor))

    def revoke(self, key_id: str) -> None:
        self._call(calls.revoke_api_key(key_id))


class WebhookSecrets(_Resource):
    """``client.webhook_secret``: the tenant's webhook signing secret."""

    def rotate(self) -> WebhookSecret:
        """A new signing secret (shown in this answer only); later deliveries are signed with it."""
        return self._call(calls.rotate_webhook_secret())


class Tenants(_Resource):
    """``client.tenants``: tenants, with an admin key."""

    def create(self, name: str, weight: float | None = None, limits: Mapping[str, Any] | None = None) -> TenantCreated:
        """A tenant with its first API key and webhook secret (``.api_key``, ``.webhook_secret``: shown once)."""
        return self._call(calls.create_tenant(name, weight, limits))

    def list_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Tenant]:
        return self._call(calls.list_tenants(limit, cursor))

    def list(self, limit: int | None = None) -> Iterator[Tenant]:
        return self._client._paginate(lambda cursor: calls.list_tenants(limit, cursor))

    def get(self, tenant_id: str) -> Tenant:
        return self._call(calls.get_tenant(tenant_id))

    def update(
        self,
        tenant_id: str,
        weight: float | None = None,
        limits: Mapping[str, Any] | None = None,
        clear: Iterable[str] = (),
    ) -> Tenant:
        """Change the weight or limit overrides; ``clear`` names limits (or ``weight``) to put back to default."""
        return self._call(calls.update_tenant(tenant_id, weight, limits, clear))

    def delete(self, tenant_id: str) -> None:
        """Delete the tenant with every row and file of it. No undo."""
        self._call(calls.delete_tenant(tenant_id))


class Client(BaseClient):
    """The Krona API, synchronously.

    >>> with krona_sdk.Client() as client:          # $KRONA_URL, $KRONA_API_KEY
    ...     training = client.trainings.create(images="photos/", instance_prompt="a photo of sks dog",
    ...                                        params={"steps": 500}, wait=True)
    ...     images = client.generate("a photo of sks dog on the moon", adapter_id=training.adapter_id)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        *,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, headers)
        if http_client is None:
            http_client = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)
        http_client.base_url = httpx.URL(self.base_url)
        http_client.headers.update(self._headers)
        self._http = http_client
        self.trainings = Trainings(self)
        self.adapters = Adapters(self)
        self.generations = Generations(self)
        self.batches = Batches(self)
        self.api_keys = ApiKeys(self)
        self.webhook_secret = WebhookSecrets(self)
        self.tenants = Tenants(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _send(self, call: Call) -> httpx.Response:
        kwargs = self._request_kwargs(call)
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **kwargs)
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
            self._sleep(delay)
            attempt += 1

    def _call(self, call: Call) -> Any:
        return self._parse(call, self._send(call))

    def _paginate(self, build: Callable[[str | None], Call]) -> Iterator[Any]:
        first = self._call(build(None))  # the first page now, so that errors show at the call

        def pages() -> Iterator[Any]:
            page = first
            while True:
                yield from page.data
                if not page.next_cursor:
                    return
                page = self._call(build(page.next_cursor))

        return pages()

    @contextlib.contextmanager
    def _stream(self, path: str, read_timeout: float) -> Iterator[httpx.Response]:
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self._http.stream("GET", path, headers={"Accept": "text/event-stream"}, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    raise self._error(response)
                yield response
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    # Operations that are not a resource's --------------------------------------------------------------------

    def generate(self, prompt: str, *, timeout: float | None = None, **fields: Any) -> list[Image]:
        """Create a generation, wait for it and return its images as PIL images (``generations.create``'s fields).
        Raises JobFailedError if it failed or was canceled."""
        generation = self.generations.create(prompt, wait=True, timeout=timeout, **fields)
        _check_succeeded(generation)
        return _decode_images([self.generations.image_bytes(generation.id, i.index) for i in generation.images])

    def usage(self, start: str | None = None, end: str | None = None, granularity: str = "day") -> Usage:
        """The tenant's finished jobs per ``day``, ``month`` or ``total`` between two UTC days (YYYY-MM-DD)."""
        return self._call(calls.usage(start, end, granularity))

    def capabilities(self) -> Capabilities:
        """The server's base model, servable factor shapes, limits and defaults."""
        return self._call(calls.capabilities())

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: raises ServiceUnavailable when a dependency is down."""
        return self._call(calls.readiness())
