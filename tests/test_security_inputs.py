"""OWASP review, issue 14 items 6-9: bounded metrics labels and a guarded /metrics, strict list cursors,
length caps on every free-text field, and a production mode that refuses embedded backends and placeholders.
"""

import base64
import json
import os
import uuid

import pytest
from helpers.api import image_files, native_adapter_file
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import func, select

from shared.db import Adapter, IdempotencyKey, Training
from shared.settings import PLACEHOLDER_SECRET, Settings
from shared.training_spec import TrainingSpec

HTTP_METRICS = ("krona_http_requests", "krona_http_request_seconds")
ALLOWED_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}


@pytest.fixture
def clean_env(monkeypatch):
    """No KRONA_* variable of the calling shell leaks into the Settings built here."""
    for name in [n for n in os.environ if n.startswith("KRONA_")]:
        monkeypatch.delenv(name)


# Item 6: /metrics --------------------------------------------------------------------------------------


def _http_series() -> set[tuple]:
    """Every (sample name, labels) of the gateway's HTTP metrics in the process registry."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in REGISTRY.collect()
        if family.name in HTTP_METRICS
        for sample in family.samples
    }


def _label_values(series: set[tuple], label: str) -> set[str]:
    return {value for _, labels in series for key, value in labels if key == label}


def test_unknown_methods_add_no_metric_series(api):
    # One odd method on each path first: the bounded "other" series may appear once, then never grows.
    api.client.request("FOOZ", "/healthz")
    api.client.request("FOOZ", f"/nope-{uuid.uuid4().hex}")
    before = _http_series()
    for method in ("FOOA", "FOOB", "BARC"):
        assert api.client.request(method, "/healthz").status_code == 405
        response = api.client.request(method, f"/nope-{uuid.uuid4().hex}")
        assert response.status_code in (404, 405)
    after = _http_series()
    assert after == before, sorted(after - before)
    assert _label_values(after, "method") <= ALLOWED_METHODS
    routes = _label_values(after, "route")
    assert not any(route.startswith("/nope-") for route in routes), routes
    assert {"/healthz", "unmatched"} <= routes
    # The text exposition agrees: no FOO*/BARC method label anywhere.
    text = api.client.get("/metrics").text
    for method in ("FOOA", "FOOB", "BARC", "FOOZ"):
        assert f'method="{method}"' not in text


def test_route_label_is_the_path_template(api):
    api.client.get(f"/v1/trainings/trn_{uuid.uuid4().hex[:24]}", headers=api.headers())
    routes = _label_values(_http_series(), "route")
    assert "/v1/trainings/{training_id}" in routes
    assert not any(route.startswith("/v1/trainings/trn_") for route in routes)


def _prod_settings(**overrides) -> dict:
    base = {
        "env": "prod",
        "database_url": "postgresql+psycopg://krona:s3cret-db@db.internal:5432/krona",
        "broker_url": "redis://:s3cret-redis@redis.internal:6379/0",
        "s3_endpoint": "https://s3.internal:9000",
        "s3_access_key": "krona",
        "s3_secret_key": "s3cret-s3",
        "base_model": "tiny-sd",
    }
    return base | overrides


def _assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["message"]
    assert error["code"] == code
    return error


def test_metrics_token_is_required_when_set(app_with):
    client = app_with(metrics_token="tok-123")
    _assert_error(client.get("/metrics"), 401, "unauthorized")
    assert client.get("/metrics").headers["WWW-Authenticate"] == "Bearer"
    _assert_error(client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    _assert_error(client.get("/metrics", headers={"Authorization": "Basic tok-123"}), 401, "unauthorized")
    _assert_error(client.get("/metrics", headers={"Authorization": "Bearer tok-1234"}), 401, "unauthorized")
    response = client.get("/metrics", headers={"Authorization": "Bearer tok-123"})
    assert response.status_code == 200
    assert "krona_http_requests_total" in response.text


def test_metrics_disabled_in_prod_without_token(clean_env, app_with, postgres_url):
    overrides = _prod_settings(database_url=postgres_url, broker_url="redis://127.0.0.1:6379/15")
    client = app_with(**overrides)
    error = _assert_error(client.get("/metrics"), 404, "metrics_disabled")
    assert "KRONA_METRICS_TOKEN" in error["message"]
    _assert_error(client.get("/metrics", headers={"Authorization": "Bearer anything"}), 404, "metrics_disabled")
    assert client.get("/healthz").status_code == 200
    client = app_with(**overrides, metrics_token="prod-token")
    assert client.get("/metrics", headers={"Authorization": "Bearer prod-token"}).status_code == 200
    _assert_error(client.get("/metrics"), 401, "unauthorized")


def test_metrics_stay_open_in_dev_without_token(api):
    assert api.context.settings.env == "dev" and api.context.settings.metrics_token is None
    assert api.client.get("/metrics").status_code == 200


# Item 7: list cursors ----------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(value) -> str:
    return _b64(json.dumps(value).encode())


BAD_CURSORS = {
    # the shape of the finding (a list cursor), and the old base64-JSON form in general
    "base64 list with an object": _cursor(["2026-01-01", {"a": 1}]),
    "base64 list of two strings": _cursor(["2026-01-01T00:00:00+00:00", "trn_000000000000000000000000"]),
    "a JSON object": _cursor({"a": 1}),
    "not base64": "!!!not base64!!!",
    "deeply nested": _b64(b"[" * 5000 + b"]" * 5000),
    # near misses of "<id>.<microseconds>"
    "no timestamp": "trn_000000000000000000000000",
    "empty timestamp": "trn_000000000000000000000000.",
    "timestamp not a number": "trn_000000000000000000000000.yesterday",
    "negative timestamp": "trn_000000000000000000000000.-1",
    "timestamp too long": "trn_000000000000000000000000." + "9" * 17,
    "id too short": "trn_0000.1",
    "id with capitals": "TRN_000000000000000000000000.1",
    "id with a NUL": "trn_00000000000000000000000\u0000.1",
    "two dots": "trn_000000000000000000000000.1.2",
    "far too long": "x" * 300,
}


@pytest.mark.parametrize("path", ["/v1/trainings", "/v1/adapters"])
@pytest.mark.parametrize("case", sorted(BAD_CURSORS))
def test_malformed_cursor_is_400(api, path, case):
    response = api.client.get(path, params={"cursor": BAD_CURSORS[case]}, headers=api.headers())
    _assert_error(response, 400, "invalid_cursor")


@pytest.mark.parametrize("path", ["/v1/trainings", "/v1/adapters"])
def test_well_formed_cursor_still_pages(api, path):
    for cursor in (
        "trn_000000000000000000000000.1795936800000000",  # any string of the documented pattern is accepted
        "adp_ffffffffffffffffffffffff.0",
    ):
        response = api.client.get(path, params={"cursor": cursor}, headers=api.headers())
        assert response.status_code == 200, response.text[:500]
        assert response.json()["data"] == []


# Item 8: length caps (and NUL, which PostgreSQL text refuses) -------------------------------------------


def _counts(api):
    with api.context.sessions() as session:
        rows = tuple(session.scalar(select(func.count()).select_from(m)) for m in (Training, Adapter, IdempotencyKey))
    return rows, sorted(api.context.storage.list(""))


def _post_training(api, data: dict, key: str):
    base = {"instance_prompt": "a photo of sks dog", "params": '{"steps": 5}'}
    headers = api.headers(**{"Idempotency-Key": key})
    return api.client.post("/v1/trainings", headers=headers, data=base | data, files=image_files(2))


def _post_adapter(api, data: dict):
    files = {"file": ("a.safetensors", native_adapter_file(), "application/octet-stream")}
    return api.client.post("/v1/adapters", headers=api.headers(), data=data, files=files)


def _params(**params) -> dict:
    return {"params": json.dumps(params)}


# case: (form fields, what the error message must name). A 100,000-character prompt is over the 64 KiB
# params cap before the prompt cap is reached; the 60,000-character ones reach the prompt cap itself.
LONG_TRAINING_FIELDS = {
    "class_prompt of 100,000 characters": (_params(class_prompt="x" * 100_000), "params"),
    "validation_prompt of 100,000 characters": (_params(validation_prompt="x" * 100_000), "params"),
    "class_prompt of 60,000 characters": (_params(class_prompt="x" * 60_000), "class_prompt"),
    "class_prompt with prior preservation": (
        _params(prior_preservation=True, class_prompt="a dog " * 10_000),
        "class_prompt",
    ),
    "validation_prompt of 60,000 characters": (_params(validation_prompt="x" * 60_000), "validation_prompt"),
    "class_prompt of 1001 characters": (_params(class_prompt="x" * 1001), "class_prompt"),
    "validation_prompt of 1001 characters": (_params(validation_prompt="x" * 1001), "validation_prompt"),
    "class_prompt not a string": (_params(prior_preservation=True, class_prompt=5), "class_prompt"),
    "17 target modules": (_params(target_modules=["to_q"] * 17), "target_modules"),
    "a 101-character target module": (_params(target_modules=["x" * 101]), "target_modules"),
    "instance_prompt of 1001 characters": ({"instance_prompt": "x" * 1001}, "instance_prompt"),
    "name of 201 characters": ({"name": "n" * 201}, "name"),
    "webhook_url of 2001 characters": ({"webhook_url": "https://example.com/" + "a" * 1981}, "webhook_url"),
    "params over 64 KiB": ({"params": '{"steps": 5' + " " * 65_536 + "}"}, "params"),
    # PostgreSQL text cannot hold NUL: these were 500s (and left the images in storage).
    "name with a NUL": ({"name": "my\x00dog"}, "name"),
    "webhook_url with a NUL": ({"webhook_url": "https://example.com/\x00"}, "webhook_url"),
    "instance_prompt with a NUL": ({"instance_prompt": "a photo of sks\x00 dog"}, "instance_prompt"),
    "class_prompt with a NUL": (_params(class_prompt="a dog\x00"), "class_prompt"),
}


@pytest.mark.parametrize("case", sorted(LONG_TRAINING_FIELDS))
def test_overlong_training_fields_are_refused_and_write_nothing(api, case):
    data, field = LONG_TRAINING_FIELDS[case]
    before = _counts(api)
    response = _post_training(api, data, key=f"long-{case}")
    error = _assert_error(response, 422, response.json()["error"]["code"])
    assert error["code"] in ("invalid_request", "invalid_params"), error
    assert field in error["message"], error
    assert _counts(api) == before
    assert api.enqueuer.sent == []


def test_name_of_200_characters_is_accepted(api):
    response = _post_training(api, {"name": "n" * 200}, key=f"ok-{uuid.uuid4().hex}")
    assert response.status_code == 202, response.text[:500]
    assert response.json()["name"] == "n" * 200
    response = _post_adapter(api, {"name": "m" * 200})
    assert response.status_code == 201, response.text[:500]
    assert response.json()["name"] == "m" * 200


@pytest.mark.parametrize(
    ("data", "field"),
    [({"name": "n" * 201}, "name"), ({"base_model": "b" * 301}, "base_model"), ({"name": "a\x00b"}, "name")],
    ids=["name of 201 characters", "base_model of 301 characters", "name with a NUL"],
)
def test_overlong_adapter_fields_are_refused_and_write_nothing(api, data, field):
    before = _counts(api)
    error = _assert_error(_post_adapter(api, data), 422, "invalid_request")
    assert field in error["message"], error
    assert _counts(api) == before


@pytest.mark.parametrize("field", ["class_prompt", "validation_prompt", "instance_prompt"])
def test_training_spec_caps_prompts(field):
    base = {"instance_prompt": "a photo of sks dog"}
    TrainingSpec(**(base | {field: "x" * 1000}))
    with pytest.raises(ValueError, match=f"{field}: String should have at most 1000 characters \\(got 1,001\\)"):
        TrainingSpec(**(base | {field: "x" * 1001}))
    if field != "instance_prompt":
        with pytest.raises(ValueError, match=f"{field}: Input should be a valid string \\(got 5\\)"):
            TrainingSpec(**(base | {field: 5}))


def test_training_spec_caps_target_modules():
    base = {"instance_prompt": "a photo of sks dog"}
    with pytest.raises(ValueError, match="target_modules: Tuple should have at most 16 items"):
        TrainingSpec(**base, target_modules=("to_q",) * 17)
    with pytest.raises(ValueError, match=r"target_modules\.0: String should have at most 100 characters"):
        TrainingSpec(**base, target_modules=("x" * 101,))
    with pytest.raises(ValueError, match=r"target_modules\.1: Input should be a valid string"):
        TrainingSpec(**base, target_modules=("to_q", 5))
    with pytest.raises(ValueError, match="target_modules: Input should be a valid tuple"):
        TrainingSpec(**base, target_modules=5)
    # One name given as a string is one module (as in KronaConfig), not its characters.
    assert TrainingSpec(**base, target_modules="to_q").target_modules == ("to_q",)
    assert len(TrainingSpec(**base, target_modules=["to_q"] * 16).target_modules) == 16


# Item 9: production settings ---------------------------------------------------------------------------


def test_complete_prod_configuration_is_accepted(clean_env):
    settings = Settings(**_prod_settings())
    assert settings.env == "prod"
    assert Settings(**_prod_settings(metrics_token="a-real-token")).metrics_token.get_secret_value() == "a-real-token"


PROD_REFUSALS = {
    "no database URL": ({"database_url": None}, "KRONA_DATABASE_URL"),
    "SQLite database": ({"database_url": "sqlite:////var/lib/krona/krona.db"}, "KRONA_DATABASE_URL"),
    "SQLite database with a driver": ({"database_url": "sqlite+pysqlite:///krona.db"}, "KRONA_DATABASE_URL"),
    "no broker URL": ({"broker_url": None}, "KRONA_BROKER_URL"),
    "SQLite broker": ({"broker_url": "sqla+sqlite:///broker.db"}, "KRONA_BROKER_URL"),
    "filesystem broker": ({"broker_url": "filesystem://"}, "KRONA_BROKER_URL"),
    "memory broker": ({"broker_url": "memory://"}, "KRONA_BROKER_URL"),
    "local storage": ({"s3_endpoint": None, "s3_access_key": None, "s3_secret_key": None}, "KRONA_S3_ENDPOINT"),
    "private webhooks allowed": ({"allow_private_webhooks": True}, "KRONA_ALLOW_PRIVATE_WEBHOOKS"),
    "placeholder S3 secret": ({"s3_secret_key": PLACEHOLDER_SECRET}, "KRONA_S3_SECRET_KEY"),
    "empty S3 secret": ({"s3_secret_key": ""}, "KRONA_S3_SECRET_KEY"),
    "placeholder S3 access key": ({"s3_access_key": PLACEHOLDER_SECRET}, "KRONA_S3_ACCESS_KEY"),
    "placeholder metrics token": ({"metrics_token": PLACEHOLDER_SECRET}, "KRONA_METRICS_TOKEN"),
    "empty metrics token": ({"metrics_token": ""}, "KRONA_METRICS_TOKEN"),
    "placeholder database password": (
        {"database_url": "postgresql+psycopg://krona:change-me@postgres:5432/krona"},
        "KRONA_DATABASE_URL",
    ),
    "placeholder broker password": ({"broker_url": "redis://:change-me@redis:6379/0"}, "KRONA_BROKER_URL"),
}


@pytest.mark.parametrize("case", sorted(PROD_REFUSALS))
def test_prod_refuses_embedded_backends_and_placeholders(clean_env, case):
    overrides, variable = PROD_REFUSALS[case]
    with pytest.raises(ValidationError) as info:
        Settings(**_prod_settings(**overrides))
    message = str(info.value)
    assert variable in message, message
    # Refused for this reason alone: no other variable is blamed.
    others = {v for _, v in PROD_REFUSALS.values()} - {variable}
    assert not [v for v in others if v in message], message
    # The same values are fine in dev (embedded mode), except an S3 endpoint without a secret.
    if case != "empty S3 secret":
        Settings(**(_prod_settings(**overrides) | {"env": "dev"}))


def test_prod_refusals_read_the_environment(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("KRONA_ENV", "prod")
    monkeypatch.setenv("KRONA_DATA_DIR", str(tmp_path))
    with pytest.raises(ValidationError, match="KRONA_DATABASE_URL"):
        Settings()
    for name, value in _prod_settings().items():
        monkeypatch.setenv(f"KRONA_{name.upper()}", value)
    assert Settings().env == "prod"


def test_training_spec_is_strict_and_names_every_problem_on_one_line():
    from shared.training_spec import InvalidSpec

    with pytest.raises(InvalidSpec) as caught:
        TrainingSpec(instance_prompt="a photo of sks dog", steps="2", seed=True, learning_rate=float("nan"), bogus=1)
    message = str(caught.value)
    assert "\n" not in message, message
    for part in (
        "steps: Input should be a valid integer (got '2')",
        "seed: Input should be a valid integer (got True)",
        "learning_rate: Input should be a finite number",
        "bogus: unknown parameter",
    ):
        assert part in message, message
    with pytest.raises(InvalidSpec, match=r"evaluate: prompts: Input should be less than or equal to 25 \(got 26\)"):
        TrainingSpec(instance_prompt="a photo of sks dog", evaluate={"prompts": 26})
    # What a row, a checkpoint and an adapter file keep (JSON) reads back as the same spec.
    spec = TrainingSpec(instance_prompt="a photo of sks dog", evaluate={"prompts": 2}, target_modules=["to_q"])
    assert TrainingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
