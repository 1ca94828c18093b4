"""Webhook targets, signatures and delivery (to a receiver on 127.0.0.1, allowed by setting)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest
from sqlalchemy import update

from shared.db import Training, utcnow
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.webhooks import SIGNATURE_HEADER, check_webhook_url, sign, verify


def test_targets():
    for bad in ("http://127.0.0.1/x", "http://localhost:8080/x", "http://10.1.2.3/", "http://169.254.169.254/",
                "http://[::1]/x", "ftp://example.com/", "http://user:pw@example.com/", "not a url"):  # fmt: skip
        with pytest.raises(ValueError):
            check_webhook_url(bad)
    check_webhook_url("http://127.0.0.1:9/x", allow_private=True)
    check_webhook_url("http://93.184.216.34/hook")  # a public literal address needs no DNS


def test_signature_round_trip():
    body = b'{"type": "training.succeeded"}'
    header = sign(body, "secret")
    assert verify(body, header, "secret")
    assert not verify(body + b" ", header, "secret")
    assert not verify(body, header, "other")
    assert not verify(body, sign(body, "secret", timestamp=1), "secret")  # too old


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list] = []
    status = 200

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        type(self).received.append((self.rfile.read(length), self.headers[SIGNATURE_HEADER]))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_delivery_is_signed_retried_and_marked(postgres_url, tmp_path):

    from workers.runtime import build_runtime
    from workers.webhooks import WebhookFailed, deliver_webhook

    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    settings = Settings(
        database_url=postgres_url, data_dir=tmp_path, allow_private_webhooks=True, webhook_secret="s3cret"
    )
    rt = build_runtime(settings, storage=LocalStorage(tmp_path / "blobs"))
    from shared.tenants import create_tenant

    with rt.sessions() as session:
        tenant, _ = create_tenant(session, f"hooks-{tmp_path.name[-8:]}")
        row = Training(
            tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="p", status="succeeded", webhook_url=url,
            finished_at=utcnow(), image_keys=["a", "b"], total_steps=3, step=3,
        )  # fmt: skip
        session.add(row)
        session.commit()
        training_id = row.id
    try:
        _Receiver.status = 503
        with pytest.raises(WebhookFailed):
            deliver_webhook(rt, f"training:{training_id}")
        _Receiver.status = 200
        assert deliver_webhook(rt, f"training:{training_id}") == "delivered"
        assert deliver_webhook(rt, f"training:{training_id}") == "skipped"  # delivered once only
    finally:
        server.shutdown()
    body, signature = _Receiver.received[-1]
    assert verify(body, signature, "s3cret")
    event = json.loads(body)
    assert event["type"] == "training.succeeded" and event["data"]["id"] == training_id
    with rt.sessions() as session:
        assert session.get(Training, training_id).webhook_delivered_at is not None
        session.execute(update(Training).where(Training.id == training_id).values(webhook_delivered_at=None))
        session.commit()
    # Private targets are refused at delivery time too when the setting is off.
    strict = build_runtime(Settings(database_url=postgres_url, data_dir=tmp_path), storage=LocalStorage(tmp_path / "b"))
    assert deliver_webhook(strict, f"training:{training_id}") == "refused"


def test_admin_create_tenant_prints_a_working_key(tmp_path, capsys):
    from services.cli.main import main
    from shared.db import make_engine, make_session_factory, upgrade_to_head
    from shared.tenants import tenant_for_key

    data_dir = tmp_path / "data"
    assert main(["migrate", "--data-dir", str(data_dir)]) == 0
    assert main(["admin", "create-tenant", "acme", "--data-dir", str(data_dir)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    url = Settings(data_dir=data_dir).resolved_database_url
    upgrade_to_head(url)
    with make_session_factory(make_engine(url))() as session:
        assert tenant_for_key(session, key).name == "acme"
    assert main(["admin", "create-tenant", "acme", "--data-dir", str(data_dir)]) == 2  # taken
