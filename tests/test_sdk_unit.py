"""The Python SDK (sdk/python, krona_sdk) without a server: retries, idempotency keys, errors, events, pages,
with httpx.MockTransport answering as the API would."""

import asyncio
import json
import uuid

import httpx
import krona_sdk
import pytest
from krona_sdk._sse import SSEDecoder

URL = "http://krona.test"
TRAINING = {
    "id": "trn_1",
    "status": "queued",
    "base_model": "tiny-sd",
    "instance_prompt": "a photo of sks toy",
    "progress": {"step": 0, "total_steps": 4, "loss": None, "eta_seconds": None},
    "params": {"steps": 4},
    "num_images": 2,
    "created_at": "2026-11-29T10:00:00+00:00",
    "updated_at": "2026-11-29T10:00:00+00:00",
}
PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 16


def error(status: int, code: str, message: str = "no", headers=None, details=None) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return httpx.Response(status, json=body, headers={"X-Request-ID": f"req-{status}", **(headers or {})})


def training(**changes) -> dict:
    body = json.loads(json.dumps(TRAINING))
    progress = changes.pop("progress", {})
    body["progress"].update(progress)
    body.update(changes)
    return body


class Recorder:
    """A MockTransport handler that answers from a list (the last answer repeats) and keeps every request."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def client_for(handler, **kwargs) -> tuple[krona_sdk.Client, list[float]]:
    client = krona_sdk.Client(URL, api_key="krona_test", transport=httpx.MockTransport(handler), **kwargs)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # no real waiting in these tests
    return client, sleeps


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("KRONA_URL", "http://example.test:9000/")
    monkeypatch.setenv("KRONA_API_KEY", "krona_env")
    seen = Recorder(httpx.Response(200, json={"status": "ok"}))
    client = krona_sdk.Client(transport=httpx.MockTransport(seen))
    assert client.base_url == "http://example.test:9000" and client.api_key == "krona_env"
    client.ready()
    request = seen.requests[0]
    assert str(request.url) == "http://example.test:9000/readyz"
    assert request.headers["authorization"] == "Bearer krona_env"
    assert request.headers["user-agent"].startswith(f"krona-sdk/{krona_sdk.__version__} python/3.")
    monkeypatch.delenv("KRONA_URL")
    assert krona_sdk.Client(api_key="k").base_url == "http://127.0.0.1:8000"


def test_a_create_retried_after_429_sends_the_same_idempotency_key(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG)
    seen = Recorder(
        error(429, "rate_limited", headers={"Retry-After": "2"}),
        error(503, "database_unavailable", headers={"Retry-After": "1"}),
        httpx.Response(202, json=training()),
    )
    client, sleeps = client_for(seen)
    created = client.trainings.create(images=tmp_path, instance_prompt="a photo of sks toy", params={"steps": 4})
    assert created.id == "trn_1" and len(seen.requests) == 3
    keys = {r.headers["idempotency-key"] for r in seen.requests}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert sleeps == [2.0, 1.0]  # Retry-After, honoured
    body = seen.requests[-1].content
    assert b'name="params"' in body and b'{"steps": 4}' in body and body.count(b'name="images"') == 2

    seen = Recorder(error(429, "rate_limited", headers={"Retry-After": "0"}), httpx.Response(202, json=training()))
    client, _ = client_for(seen)
    client.trainings.create(images=[PNG, PNG], instance_prompt="p", idempotency_key="mine-1")
    assert [r.headers["idempotency-key"] for r in seen.requests] == ["mine-1", "mine-1"]


def test_generation_and_batch_creates_carry_one_key_per_call():
    seen = Recorder(error(500, "internal"), httpx.Response(202, json={"id": "gen_1", "status": "queued"}))
    client, _ = client_for(seen)
    client.generations.create("a", steps=2, seed=3)
    assert len(seen.requests) == 2  # 5xx retried: the key makes the create safe to repeat
    first, second = (r.headers["idempotency-key"] for r in seen.requests)
    assert first == second and json.loads(seen.requests[0].content) == {"prompt": "a", "steps": 2, "seed": 3}
    seen.answers = [httpx.Response(202, json={"id": "gen_2", "status": "queued"})]
    client.generations.create("b")
    assert seen.requests[-1].headers["idempotency-key"] != first  # a new call, a new key

    seen = Recorder(httpx.Response(202, json={"id": "bat_1", "total": 2, "counts": {"queued": 2}}))
    client, _ = client_for(seen)
    batch = client.batches.create([{"prompt": "a"}, {"prompt": "b", "steps": 2}], idempotency_key="b-1")
    assert batch.total == 2 and seen.requests[0].headers["idempotency-key"] == "b-1"
    assert json.loads(seen.requests[0].content) == {"generations": [{"prompt": "a"}, {"prompt": "b", "steps": 2}]}


def test_backoff_is_exponential_with_jitter_and_capped():
    seen = Recorder(error(503, "broker_unavailable"))
    client, sleeps = client_for(seen, max_retries=6)
    with pytest.raises(krona_sdk.ServiceUnavailable) as caught:
        client.trainings.get("trn_1")
    assert len(seen.requests) == 7 and len(sleeps) == 6
    for attempt, delay in enumerate(sleeps):
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert caught.value.status == 503 and caught.value.code == "broker_unavailable"
    assert caught.value.retry_after is None and caught.value.request_id == "req-503"


def test_a_long_retry_after_is_left_to_the_caller():
    seen = Recorder(error(429, "queue_full", headers={"Retry-After": "600"}))
    client, sleeps = client_for(seen)
    with pytest.raises(krona_sdk.RateLimited) as caught:
        client.generations.create("a")
    assert len(seen.requests) == 1 and sleeps == [] and caught.value.retry_after == 600.0


def test_other_4xx_are_not_retried_and_map_to_their_class():
    cases = [
        (400, krona_sdk.BadRequest),
        (401, krona_sdk.AuthenticationError),
        (403, krona_sdk.PermissionDenied),
        (404, krona_sdk.NotFound),
        (409, krona_sdk.Conflict),
        (410, krona_sdk.Gone),
        (413, krona_sdk.PayloadTooLarge),
        (415, krona_sdk.UnsupportedMedia),
        (422, krona_sdk.InvalidRequest),
    ]
    for status, cls in cases:
        seen = Recorder(error(status, f"code_{status}", f"message {status}", details={"n": status}))
        client, sleeps = client_for(seen)
        with pytest.raises(cls) as caught:
            client.adapters.get("adp_1")
        exc = caught.value
        assert isinstance(exc, krona_sdk.KronaError) and len(seen.requests) == 1 and sleeps == []
        assert (exc.status, exc.code, str(exc), exc.details) == (
            status,
            f"code_{status}",
            f"message {status}",
            {"n": status},
        )
        assert exc.request_id == f"req-{status}"
    seen = Recorder(httpx.Response(502, text="<html>bad gateway</html>"))
    client, _ = client_for(seen, max_retries=1)
    with pytest.raises(krona_sdk.ServerError) as caught:
        client.adapters.get("adp_1")
    assert caught.value.status == 502 and "bad gateway" in str(caught.value) and len(seen.requests) == 2


def test_unsafe_requests_are_retried_only_when_nothing_was_sent():
    # An API key create has no Idempotency-Key: after a broken answer or a 500 it may exist, so no retry.
    for failure in (httpx.ReadError("reset"), error(500, "internal")):
        seen = Recorder(failure, httpx.Response(201, json={"id": "key_1", "key": "krona_x"}))
        client, _ = client_for(seen)
        with pytest.raises(krona_sdk.KronaError):
            client.api_keys.create("ci")
        assert len(seen.requests) == 1
    # A connection never made, a 429 or a 503: nothing was done, so it is sent again.
    for failure in (httpx.ConnectError("refused"), error(429, "rate_limited"), error(503, "database_unavailable")):
        seen = Recorder(failure, httpx.Response(201, json={"id": "key_1", "key": "krona_x"}))
        client, _ = client_for(seen)
        assert client.api_keys.create("ci").key == "krona_x" and len(seen.requests) == 2
    # Reads are retried after a broken answer too.
    seen = Recorder(httpx.ReadError("reset"), httpx.Response(200, json=training()))
    client, _ = client_for(seen)
    assert client.trainings.get("trn_1").id == "trn_1" and len(seen.requests) == 2


def test_an_unreachable_server_is_one_clear_error():
    seen = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    client, sleeps = client_for(seen, max_retries=2)
    with pytest.raises(krona_sdk.APIConnectionError) as caught:
        client.trainings.list_page()
    assert str(caught.value) == f"cannot reach {URL}: is `krona up` running? set base_url or KRONA_URL"
    assert len(seen.requests) == 3 and len(sleeps) == 2
    seen = Recorder(httpx.ReadTimeout("slow"))
    client, _ = client_for(seen, max_retries=0)
    with pytest.raises(krona_sdk.APITimeoutError):
        client.trainings.get("trn_1")


def test_no_api_key_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("KRONA_API_KEY", raising=False)
    client = krona_sdk.Client(URL, transport=httpx.MockTransport(Recorder(error(401, "unauthorized", "no key"))))
    with pytest.raises(krona_sdk.AuthenticationError, match="set KRONA_API_KEY"):
        client.trainings.get("trn_1")


def test_lists_page_through_next_cursor():
    def pages(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        number = int(cursor) if cursor else 0
        data = [training(id=f"trn_{number}_{i}") for i in range(2)]
        return httpx.Response(200, json={"data": data, "next_cursor": str(number + 1) if number < 2 else None})

    seen = Recorder(pages)
    client, _ = client_for(seen)
    ids = [t.id for t in client.trainings.list(status="succeeded", limit=2)]
    assert ids == ["trn_0_0", "trn_0_1", "trn_1_0", "trn_1_1", "trn_2_0", "trn_2_1"]
    assert [r.url.params.get("cursor") for r in seen.requests] == [None, "1", "2"]
    assert all(r.url.params["status"] == "succeeded" and r.url.params["limit"] == "2" for r in seen.requests)
    page = client.trainings.list_page(limit=2, cursor="1")
    assert [t.id for t in page.data] == ["trn_1_0", "trn_1_1"] and page.next_cursor == "2"


def test_new_server_fields_do_not_break_the_models():
    body = training(status="running", progress={"step": 2, "phase": "training"})
    body["brand_new_field"] = {"x": 1}
    parsed = krona_sdk.Training.model_validate(body)
    assert parsed.brand_new_field == {"x": 1} and parsed.phase == "training"
    assert krona_sdk.Training.model_validate({"id": "trn_2", "status": "queued"}).progress.step == 0


def test_phase_is_read_from_the_server_or_derived():
    def phase(**changes) -> str:
        return krona_sdk.Training.model_validate(training(**changes)).phase

    assert phase(status="queued") == "queued"
    assert phase(status="running", progress={"step": 0}) == "loading_model"
    assert phase(status="running", progress={"step": 2}) == "training"
    assert phase(status="running", progress={"step": 4}) == "uploading"
    assert phase(status="running", progress={"step": 4}, params={"evaluate": True}) == "evaluating"
    assert phase(status="running", progress={"step": 0, "phase": "class_images"}) == "class_images"
    assert phase(status="succeeded", progress={"step": 4}) == "succeeded"
    queued = krona_sdk.Training.model_validate(training(queue_position=3, progress={"phase": "queued"}))
    assert queued.position == 3 and queued.phase == "queued"
    generation = {"id": "gen_1", "status": "running", "phase": "generating", "num_images": 1}
    assert krona_sdk.Generation.model_validate(generation).phase == "generating"
    assert krona_sdk.Generation.model_validate({**generation, "status": "failed"}).phase == "failed"
    assert krona_sdk.Generation.model_validate({"id": "gen_2", "status": "running"}).phase == "running"
    batch = krona_sdk.Batch.model_validate({"id": "bat_1", "total": 3, "counts": {"succeeded": 2, "running": 1}})
    assert not batch.done and batch.finished == 2 and batch.status == "running"


def test_sse_decoder():
    decoder = SSEDecoder()
    lines = [": ping", "event: progress", 'data: {"a":', "data: 1}", "", "", "event: done", "data: 2", ""]
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.event, e.data) for e in events] == [("progress", '{"a":\n1}'), ("done", "2")]


def sse(*bodies: dict) -> bytes:
    chunks = [": ping\n\n"]
    for body in bodies:
        kind = "done" if body["status"] in ("succeeded", "failed", "canceled") else "progress"
        chunks.append(f"event: {kind}\ndata: {json.dumps(body)}\n\n")
    return "".join(chunks).encode()


def test_wait_follows_the_event_stream():
    steps = [training(status="running", progress={"step": s}) for s in (0, 1, 2, 3)]
    done = training(status="succeeded", adapter_id="adp_1", progress={"step": 4})
    seen = Recorder(httpx.Response(200, content=sse(*steps, done), headers={"content-type": "text/event-stream"}))
    client, sleeps = client_for(seen)
    observed = []
    result = client.trainings.wait("trn_1", on_progress=lambda t: observed.append((t.phase, t.progress.step)))
    assert result.adapter_id == "adp_1" and len(seen.requests) == 1 and sleeps == []
    assert seen.requests[0].url.path == "/v1/trainings/trn_1/events"
    assert observed == [("loading_model", 0), ("training", 1), ("training", 2), ("training", 3), ("succeeded", 4)]


def test_wait_falls_back_to_polling_with_backoff_when_the_stream_fails():
    polls = [training(status="running", progress={"step": s}) for s in (1, 1, 2)]
    polls.append(training(status="succeeded", progress={"step": 4}))

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return error(429, "too_many_streams")
        return httpx.Response(200, json=polls.pop(0))

    client, sleeps = client_for(Recorder(handler), max_retries=0)
    observed = []
    result = client.trainings.wait("trn_1", on_progress=lambda t: observed.append(t.progress.step))
    assert result.status == "succeeded" and observed == [1, 2, 4]  # the repeated step 1 is not reported twice
    assert sleeps == pytest.approx([0.5, 0.75, 1.125])


def test_wait_rides_out_429_and_503_while_polling_and_stops_at_its_timeout():
    answers = [
        error(429, "rate_limited", headers={"Retry-After": "3"}),
        error(503, "database_unavailable", headers={"Retry-After": "1"}),
        httpx.Response(200, json={"id": "gen_1", "status": "succeeded", "images": [{"index": 0}]}),
    ]
    client, sleeps = client_for(Recorder(*answers), max_retries=0)
    assert client.generations.wait("gen_1").status == "succeeded" and sleeps == [3.0, 1.0]

    client, _ = client_for(Recorder(httpx.Response(200, json={"id": "gen_1", "status": "running"})))
    with pytest.raises(krona_sdk.WaitTimeoutError) as caught:
        client.generations.wait("gen_1", timeout=0)
    assert caught.value.resource.status == "running" and "goes on" in str(caught.value)


def test_wait_reports_a_missing_training_at_once():
    client, _ = client_for(Recorder(error(404, "training_not_found", "no training trn_x")))
    with pytest.raises(krona_sdk.NotFound) as caught:
        client.trainings.wait("trn_x")
    assert caught.value.code == "training_not_found"


def test_images_from_folders_globs_paths_bytes_and_files(tmp_path):
    from krona_sdk._files import read_images

    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(PNG)
    assert [p[1][0] for p in read_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p[1][0] for p in read_images(str(tmp_path / "*.png"))] == ["b.png"]
    with open(tmp_path / "b.png", "rb") as f:
        parts = read_images([tmp_path / "a.jpg", PNG, f])
    assert [(p[1][0], p[1][2]) for p in parts] == [
        ("a.jpg", "image/png"),
        ("image-1.png", "image/png"),
        ("b.png", "image/png"),
    ]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_images(str(tmp_path / "*.webp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG/WebP images"):
        read_images(tmp_path / "empty")


def test_tenant_update_sends_only_what_changes():
    seen = Recorder(
        httpx.Response(200, json={"id": "ten_1", "name": "acme", "weight": 1.0, "limits": {}, "effective_limits": {}})
    )
    client, _ = client_for(seen)
    client.tenants.update("ten_1", limits={"rate_limit_per_second": 2}, clear=["weight", "max_queued_jobs"])
    assert json.loads(seen.requests[0].content) == {
        "weight": None,
        "limits": {"max_queued_jobs": None, "rate_limit_per_second": 2},
    }
    with pytest.raises(ValueError, match="nothing to change"):
        client.tenants.update("ten_1")


def test_the_async_client_retries_and_waits():
    answers = [
        error(429, "rate_limited", headers={"Retry-After": "0"}),
        httpx.Response(202, json={"id": "gen_1", "status": "queued"}),
        httpx.Response(200, json={"id": "gen_1", "status": "running"}),
        httpx.Response(200, json={"id": "gen_1", "status": "succeeded", "images": []}),
    ]
    seen = Recorder(*answers)

    async def handler(request: httpx.Request) -> httpx.Response:
        return seen(request)

    async def run():
        async with krona_sdk.AsyncClient(URL, api_key="k", transport=httpx.MockTransport(handler)) as client:
            slept = []

            async def no_sleep(seconds):
                slept.append(seconds)

            client._sleep = no_sleep
            generation = await client.generations.create("a", wait=True)
            with pytest.raises(krona_sdk.NotFound):
                seen.answers = [error(404, "generation_not_found")]
                await client.generations.get("gen_x")
            return generation, slept

    generation, slept = asyncio.run(run())
    assert generation.status == "succeeded" and slept[0] == 0.0
    creates = [r for r in seen.requests if r.method == "POST"]
    assert len(creates) == 2 and creates[0].headers["idempotency-key"] == creates[1].headers["idempotency-key"]
