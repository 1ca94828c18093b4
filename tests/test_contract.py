"""The HTTP contract (issue 10): what the OpenAPI document promises is what the server does."""

from __future__ import annotations

import io

import pytest
from helpers.api import RecordingEnqueuer, image_files
from PIL import Image


def test_405_names_the_allowed_methods(api):
    response = api.client.put("/v1/trainings", headers=api.headers())
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_authentication_comes_before_the_body(api):
    broken = b'{"prompt": '
    no_key = api.client.post("/v1/generations", content=broken, headers={"Content-Type": "application/json"})
    assert no_key.status_code == 401 and no_key.headers["WWW-Authenticate"] == "Bearer"
    bad_key = api.client.post(
        "/v1/generations", content=broken, headers={"Content-Type": "application/json", "Authorization": "Bearer x"}
    )
    assert bad_key.status_code == 401
    with_key = api.client.post(
        "/v1/generations", content=broken, headers={**api.headers(), "Content-Type": "application/json"}
    )
    assert with_key.status_code == 422
    error = with_key.json()["error"]
    assert error["message"].startswith("the body is not valid JSON") and error["details"][0]["field"] == ""


def test_unreadable_image_message_shows_no_python_repr(api):
    files = [("images", ("a.png", b"not an image at all", "image/png")), *image_files(1)]
    response = api.client.post(
        "/v1/trainings", headers=api.headers(), data={"instance_prompt": "a photo of sks dog"}, files=files
    )
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    assert "object at 0x" not in message and "<" not in message and "not a readable image" in message


@pytest.fixture
def sqlite_api(tiny_folders, tmp_path):
    """The gateway on the embedded SQLite database (naive timestamps come back from it)."""
    import uuid

    from fastapi.testclient import TestClient
    from helpers.api import Api

    from services.gateway.app import create_app
    from shared.db import make_engine, make_session_factory, upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant

    settings = Settings(data_dir=tmp_path, base_model="tiny-sd")
    upgrade_to_head(settings.resolved_database_url)
    enqueuer = RecordingEnqueuer()
    app = create_app(settings, enqueuer=enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    with make_session_factory(make_engine(settings.resolved_database_url))() as session:
        _, key = create_tenant(session, f"lite-{uuid.uuid4().hex[:6]}")
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, context=app.state.context, enqueuer=enqueuer, keys={"acme": key})


def test_timestamps_carry_utc_on_sqlite(sqlite_api):
    api = sqlite_api
    created = api.client.post("/v1/batches", headers=api.headers(), json={"generations": [{"prompt": "a"}]}).json()
    fetched = api.client.get(f"/v1/batches/{created['id']}", headers=api.headers()).json()
    generation = api.client.get(f"/v1/generations/{created['generation_ids'][0]}", headers=api.headers()).json()
    for stamp in (created["created_at"], fetched["created_at"], generation["created_at"], generation["updated_at"]):
        assert stamp.endswith(("+00:00", "Z")), stamp


def test_png_fixture_is_an_image():  # guards the helper the tests above rely on
    Image.open(io.BytesIO(image_files(1)[0][1][1])).verify()


OPERATION_IDS = {
    ("post", "/v1/trainings"): "createTraining",
    ("get", "/v1/trainings"): "listTrainings",
    ("get", "/v1/trainings/{training_id}"): "getTraining",
    ("delete", "/v1/trainings/{training_id}"): "deleteTraining",
    ("post", "/v1/trainings/{training_id}/cancel"): "cancelTraining",
    ("get", "/v1/trainings/{training_id}/events"): "followTrainingEvents",
    ("get", "/v1/adapters"): "listAdapters",
    ("post", "/v1/adapters"): "uploadAdapter",
    ("get", "/v1/adapters/{adapter_id}"): "getAdapter",
    ("delete", "/v1/adapters/{adapter_id}"): "deleteAdapter",
    ("get", "/v1/adapters/{adapter_id}/file"): "downloadAdapterFile",
    ("post", "/v1/adapters/{adapter_id}/evaluations"): "evaluateAdapter",
    ("post", "/v1/generations"): "createGeneration",
    ("get", "/v1/generations"): "listGenerations",
    ("get", "/v1/generations/{generation_id}"): "getGeneration",
    ("delete", "/v1/generations/{generation_id}"): "deleteGeneration",
    ("get", "/v1/usage"): "getUsage",
    ("get", "/v1/generations/{generation_id}/images/{index}"): "getGenerationImage",
    ("post", "/v1/batches"): "createBatch",
    ("get", "/v1/batches"): "listBatches",
    ("get", "/v1/batches/{batch_id}"): "getBatch",
    ("post", "/v1/batches/{batch_id}/cancel"): "cancelBatch",
    ("post", "/v1/generations/{generation_id}/cancel"): "cancelGeneration",
    ("get", "/v1/capabilities"): "getCapabilities",
    ("get", "/v1/operator/queues"): "getQueues",
    ("get", "/v1/operator/workers"): "getWorkers",
    ("get", "/v1/operator/usage"): "getUsagePerTenant",
    ("get", "/v1/operator/failures"): "getFailures",
    ("post", "/v1/webhook-secret/rotate"): "rotateWebhookSecret",
    ("post", "/v1/api-keys"): "createApiKey",
    ("get", "/v1/api-keys"): "listApiKeys",
    ("delete", "/v1/api-keys/{key_id}"): "revokeApiKey",
    ("post", "/v1/tenants"): "createTenant",
    ("get", "/v1/tenants"): "listTenants",
    ("get", "/v1/tenants/{tenant_id}"): "getTenant",
    ("patch", "/v1/tenants/{tenant_id}"): "updateTenant",
    ("delete", "/v1/tenants/{tenant_id}"): "deleteTenant",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("get", "/metrics"): "metrics",
}


def test_openapi_document_validates_and_declares_auth_errors_and_ids(api):
    from openapi_spec_validator import validate

    spec = api.client.get("/openapi.json").json()
    validate(spec)  # OpenAPI 3.1, as an outside validator reads it
    assert spec["components"]["securitySchemes"]["apiKey"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # the API never answers that shape
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    seen = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            seen[(method, path)] = operation["operationId"]
            responses = operation["responses"]
            if not path.startswith("/v1/"):
                continue
            assert operation["security"] == [{"apiKey": []}], (method, path)
            assert not any(p.get("name", "").lower() == "authorization" for p in operation.get("parameters", []))
            statuses = {"401", "422", "503"} | ({"404"} if "{" in path else set())
            for status in statuses:
                assert responses[status]["content"]["application/json"]["schema"] == envelope, (method, path, status)
            assert "Retry-After" in responses["503"]["headers"]
    assert seen == OPERATION_IDS
    form = spec["components"]["schemas"]["Body_createTraining"]
    assert form["properties"]["images"]["minItems"] == 2 and form["properties"]["images"]["maxItems"] == 20
    assert form["properties"]["images"]["items"]["format"] == "binary" and form["additionalProperties"] is False
    (param,) = spec["paths"]["/v1/trainings/{training_id}"]["get"]["parameters"]
    assert param["schema"]["pattern"] == "^trn_[0-9a-f]{24}$" and param["schema"]["examples"]  # ids documented
    cursor = next(p for p in spec["paths"]["/v1/adapters"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["pattern"].startswith("^[a-z]{3}_[0-9a-f]{24}")
    binary = spec["paths"]["/v1/adapters/{adapter_id}/file"]["get"]["responses"]["200"]["content"]
    assert list(binary) == ["application/octet-stream"]
    image = spec["paths"]["/v1/generations/{generation_id}/images/{index}"]["get"]["responses"]["200"]["content"]
    assert list(image) == ["image/png", "application/octet-stream"]  # png by default, bytes to who asks
    events = spec["paths"]["/v1/trainings/{training_id}/events"]["get"]["responses"]["200"]["content"]
    assert "event: done" in events["text/event-stream"]["schema"]["description"]


def test_request_types_are_strict(api):
    """The finding: booleans and strings were coerced (seed false -> 0, steps true -> 1, "2" -> 2)."""
    for field, value in (("seed", False), ("num_images", "2"), ("steps", True), ("adapter_scale", True),
                         ("width", 64.0), ("prompt", 5), ("webhook_url", "ftp://example.com/")):  # fmt: skip
        response = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "a", field: value})
        assert response.status_code == 422, (field, value, response.text)
        assert response.json()["error"]["details"][0]["field"] == field
    ok = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "a", "adapter_scale": 1, "seed": 3})
    assert ok.status_code == 202 and ok.json()["seed"] == 3  # an integer is a number


def test_creates_answer_with_location_and_every_answer_has_a_request_id(api):
    generation = api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "a"})
    assert generation.headers["Location"] == f"/v1/generations/{generation.json()['id']}"
    assert api.client.get(generation.headers["Location"], headers=api.headers()).status_code == 200
    batch = api.client.post("/v1/batches", headers=api.headers(), json={"generations": [{"prompt": "a"}]})
    assert batch.headers["Location"] == f"/v1/batches/{batch.json()['id']}"
    training = api.client.post(
        "/v1/trainings", headers=api.headers(), data={"instance_prompt": "a photo of sks dog"}, files=image_files(2)
    )
    assert training.headers["Location"] == f"/v1/trainings/{training.json()['id']}"
    echoed = api.client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["X-Request-ID"] == "trace-42"
    assert len(api.client.get("/v1/nowhere").headers["X-Request-ID"]) == 32  # a new one, on errors too
    spec = api.client.get("/openapi.json").json()
    create = spec["paths"]["/v1/trainings"]["post"]["responses"]["202"]["headers"]
    assert {"Location", "X-Request-ID"} <= set(create)


def test_every_operation_is_described_and_the_resources_have_examples(api):
    spec = api.client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") and operation.get("description"), (method, path)
    schemas = spec["components"]["schemas"]
    for name in ("TrainingPublic", "AdapterPublic", "GenerationPublic", "BatchPublic", "GenerationCreate"):
        assert schemas[name].get("examples"), name


def test_routes_run_no_sql():
    """Routes validate, call a service function and present its result: no route module imports SQLAlchemy
    (queries live in services/gateway/services/, the job helpers and shared/)."""
    import ast
    from pathlib import Path

    routes = Path(__file__).resolve().parents[1] / "services" / "gateway" / "routes"
    offenders = []
    for path in sorted(routes.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "sqlalchemy"]
    assert not offenders, offenders
