"""`krona migrate` creates the S3 bucket when it is missing; a missing bucket is reported as such."""

import uuid

import pytest

from services.cli.main import main
from shared.storage import S3Storage, StorageError


def _storage(s3_server, bucket: str, secret_key: str | None = None) -> S3Storage:
    return S3Storage(
        endpoint=s3_server["endpoint"],
        bucket=bucket,
        access_key=s3_server["access_key"],
        secret_key=secret_key or s3_server["secret_key"],
    )


@pytest.fixture
def s3_env(s3_server, postgres_url, monkeypatch):
    bucket = f"m{uuid.uuid4().hex[:12]}"
    for name, value in {
        "KRONA_DATABASE_URL": postgres_url,
        "KRONA_S3_ENDPOINT": s3_server["endpoint"],
        "KRONA_S3_BUCKET": bucket,
        "KRONA_S3_ACCESS_KEY": s3_server["access_key"],
        "KRONA_S3_SECRET_KEY": s3_server["secret_key"],
    }.items():
        monkeypatch.setenv(name, value)
    return bucket


def test_a_missing_bucket_is_named_with_the_command_that_creates_it(s3_server):
    storage = _storage(s3_server, f"m{uuid.uuid4().hex[:12]}")
    assert storage.bucket_exists() is False
    # (SeaweedFS creates a missing bucket on the first PUT of an admin key; AWS S3 does not, so nothing relies on it.)
    for attempt in (storage.check, lambda: storage.get_bytes("a/b"), lambda: list(storage.list("a/"))):
        with pytest.raises(StorageError, match=rf"bucket '{storage.bucket}' does not exist at .*krona migrate"):
            attempt()


def test_migrate_creates_the_bucket_once(s3_server, s3_env, capsys):
    assert main(["migrate"]) == 0
    assert f"S3 bucket '{s3_env}' at {s3_server['endpoint']}: created" in capsys.readouterr().out
    storage = _storage(s3_server, s3_env)
    storage.check()
    storage.put_bytes("a/b", b"x")
    assert main(["migrate"]) == 0  # again: nothing to do, the object stays
    assert f"S3 bucket '{s3_env}' at {s3_server['endpoint']}: exists" in capsys.readouterr().out
    assert storage.get_bytes("a/b") == b"x"


def test_migrate_says_when_s3_refuses_the_credentials(s3_server, s3_env, monkeypatch, capsys):
    monkeypatch.setenv("KRONA_S3_SECRET_KEY", "wrong")
    assert main(["migrate"]) == 2
    error = capsys.readouterr().err
    assert f"refused access to bucket '{s3_env}'" in error and "KRONA_S3_SECRET_KEY" in error
    assert _storage(s3_server, s3_env).bucket_exists() is False
