"""Storage in a local folder (the embedded mode); writes are atomic renames."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .base import BlobNotFound, Storage, StorageError, check_key

__all__ = ["LocalStorage"]


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def _write(self, key: str, writer: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str = "application/octet-stream") -> None:
        self._write(key, lambda f: shutil.copyfileobj(fileobj, f, 1 << 20))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def download(self, key: str, path: str) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove folders left empty, up to the root.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.endswith(".part"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        for key in self.list(prefix):
            try:
                mtime = self._path(key).stat().st_mtime
            except FileNotFoundError:  # removed since the folder was walked
                continue
            yield key, datetime.fromtimestamp(mtime, UTC)

    def copy(self, source: str, dest: str) -> None:
        src = self._path(source)
        if not src.is_file():
            raise BlobNotFound(source)
        with open(src, "rb") as f:
            self.put_file(dest, f)

    def commit(self, temporary: str, key: str) -> None:
        src, dst = self._path(temporary), self._path(key)
        if not src.is_file():
            raise BlobNotFound(temporary)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        os.utime(dst)  # modified = when it arrived under its key, as after an S3 copy (the sweep ages by it)
        self.delete(temporary)  # prunes the empty temporary folders

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage folder {self.root} is not writable")
