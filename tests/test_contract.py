"""The HTTP contract (issue 10): what the OpenAPI document promises is what the server does."""

from __future__ import annotations

import io

import pytest
from api_helpers import RecordingEnqueuer, image_files
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

    from api_helpers import Api
    from fastapi.testclient import TestClient

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
