"""Blob storage: an S3-compatible bucket in production, a local folder in the embedded mode.

Keys look like ``tenants/<tenant>/adapters/<id>.safetensors``. Writes go to a temporary key first and
are committed by a copy/rename once the database row that points at them is about to commit, so a
crash never leaves a half-written object under a key that a row names.
"""

from .base import BlobNotFound, Storage, StorageError, storage_from_settings
from .local import LocalStorage
from .s3 import S3Storage

__all__ = ["BlobNotFound", "LocalStorage", "S3Storage", "Storage", "StorageError", "storage_from_settings"]
