"""The storage interface both backends implement."""

from __future__ import annotations

import abc
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["BlobNotFound", "Storage", "StorageError", "check_key", "storage_from_settings"]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,1000}$")


class StorageError(Exception):
    """The backend failed (unreachable, refused credentials, …)."""


class BlobNotFound(StorageError, KeyError):
    """No object under that key."""


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, without '..' segments (a local folder must not be escaped)."""
    if not _KEY.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(abc.ABC):
    """put/get/delete/exists/list by key, plus a two-phase write (temporary key, then commit)."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abc.abstractmethod
    def put_file(self, key: str, fileobj: BinaryIO, content_type: str = "application/octet-stream") -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def download(self, key: str, path: str) -> None: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if it is absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]: ...

    @abc.abstractmethod
    def list_with_times(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """(key, last modified, UTC) of every object under ``prefix``; the retention sweep ages blobs by it."""

    @abc.abstractmethod
    def copy(self, source: str, dest: str) -> None: ...

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageError if the backend is not reachable with these credentials (readiness)."""

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str | None:
        """A time-limited URL for direct download, or None when the backend has none (local folder)."""
        return None

    def temporary_key(self, key: str) -> str:
        """Where to write ``key`` before its row commits: ``tmp/<uuid>/<key>``."""
        return f"tmp/{uuid.uuid4().hex}/{check_key(key)}"

    def commit(self, temporary: str, key: str) -> None:
        """Move a temporary object to its final key (copy, then delete the temporary one)."""
        self.copy(temporary, key)
        self.delete(temporary)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for key in list(self.list(prefix)):
            self.delete(key)
            count += 1
        return count


def storage_from_settings(settings: Settings) -> Storage:
    """S3Storage when KRONA_S3_ENDPOINT is set, else LocalStorage under the blob folder."""
    # Here, not at the top: local.py and s3.py import this module (Storage, BlobNotFound).
    from .local import LocalStorage
    from .s3 import S3Storage

    if settings.s3_endpoint:
        return S3Storage(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            access_key=settings.s3_access_key or "",
            secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else "",
            region=settings.s3_region,
        )
    return LocalStorage(settings.resolved_blob_dir)
