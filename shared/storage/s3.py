"""Storage in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS): path-style addressing, SigV4.

The bucket is not created at start-up: `krona migrate` creates it when it is missing (``ensure_bucket``).
A missing bucket is reported as such, naming the bucket, the endpoint and that command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

from .base import BlobNotFound, Storage, StorageError, check_key

__all__ = ["S3Storage"]


class S3Storage(Storage):
    def __init__(self, *, endpoint: str, bucket: str, access_key: str, secret_key: str, region: str = "us-east-1"):
        # lazy: loads boto3, botocore
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        # Objects over 16 MiB go up in 16 MiB parts (adapters are smaller; checkpoints may not be).
        self.transfer = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # lazy: loads botocore
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket":
                raise StorageError(self._missing_bucket()) from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise BlobNotFound(kwargs.get("Key", "")) from None
            raise StorageError(f"S3 {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 unreachable: {exc}") from exc

    def _missing_bucket(self) -> str:
        return f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}; `krona migrate` creates it"

    def bucket_exists(self) -> bool:
        """Whether the bucket exists; StorageError when S3 is unreachable or refuses these credentials."""
        # lazy: loads botocore
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            code = _error_code(exc)  # HEAD answers have no body: the code is the HTTP status
            if code in ("404", "NoSuchBucket", "NotFound"):
                return False
            if code in ("403", "AccessDenied"):
                raise StorageError(
                    f"S3 at {self.endpoint} refused access to bucket {self.bucket!r} (HTTP 403): check "
                    f"KRONA_S3_ACCESS_KEY and KRONA_S3_SECRET_KEY, and that the key may use this bucket"
                ) from exc
            raise StorageError(f"S3 {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 unreachable: {exc}") from exc

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists; whether it was created. StorageError as for ``bucket_exists``."""
        # lazy: loads botocore
        from botocore.exceptions import BotoCoreError, ClientError

        if self.bucket_exists():
            return False
        # AWS wants the bucket's region named, except for its default region.
        location = {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
        try:
            self.client.create_bucket(Bucket=self.bucket, **({} if self.region == "us-east-1" else location))
        except ClientError as exc:
            if _error_code(exc) == "BucketAlreadyOwnedByYou":  # another `krona migrate` created it meanwhile
                return False
            raise StorageError(f"S3 at {self.endpoint} could not create bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 unreachable: {exc}") from exc
        return True

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type)

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str = "application/octet-stream") -> None:
        self._call(
            self.client.upload_fileobj,
            fileobj,
            self.bucket,
            check_key(key),
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer,
        )

    def get_bytes(self, key: str) -> bytes:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=check_key(key))
        data: bytes = response["Body"].read()
        return data

    def download(self, key: str, path: str) -> None:
        if not self.exists(key):
            raise BlobNotFound(key)
        self._call(self.client.download_file, self.bucket, check_key(key), path, Config=self.transfer)

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=check_key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=check_key(key))
            return True
        except BlobNotFound:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        for key, _ in self.list_with_times(prefix):
            yield key

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    modified = item["LastModified"]  # botocore parses it timezone-aware
                    yield item["Key"], modified.astimezone(UTC) if modified.tzinfo else modified.replace(tzinfo=UTC)
        except Exception as exc:
            if _error_code(exc) == "NoSuchBucket":
                raise StorageError(self._missing_bucket()) from exc
            raise StorageError(f"S3 list failed: {exc}") from exc

    def copy(self, source: str, dest: str) -> None:
        self._call(
            self.client.copy,
            {"Bucket": self.bucket, "Key": check_key(source)},
            self.bucket,
            check_key(dest),
            Config=self.transfer,
        )

    def check(self) -> None:
        if not self.bucket_exists():
            raise StorageError(self._missing_bucket())

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=expires_seconds
        )
        return url


def _error_code(exc: Exception) -> str:
    """The error code of a botocore ClientError ("NoSuchBucket", "404", "AccessDenied", …); "" for other errors."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
