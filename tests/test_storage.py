"""The storage contract on both backends: a real S3 server (SeaweedFS, auth checked) and a local folder."""

import httpx
import pytest

from shared.storage import BlobNotFound, LocalStorage, S3Storage, StorageError


@pytest.fixture(params=["s3", "local"])
def storage(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_storage")
    return LocalStorage(tmp_path / "blobs")


def test_put_get_list_copy_commit_delete(storage):
    storage.put_bytes("tenants/a/x.bin", b"one")
    assert storage.get_bytes("tenants/a/x.bin") == b"one"
    assert storage.exists("tenants/a/x.bin") and not storage.exists("tenants/a/y.bin")
    temporary = storage.temporary_key("tenants/a/final.bin")
    assert temporary.startswith("tmp/") and temporary.endswith("tenants/a/final.bin")
    storage.put_bytes(temporary, b"two")
    storage.commit(temporary, "tenants/a/final.bin")
    assert storage.get_bytes("tenants/a/final.bin") == b"two" and not storage.exists(temporary)
    storage.copy("tenants/a/x.bin", "tenants/b/x.bin")
    assert sorted(storage.list("tenants/")) == ["tenants/a/final.bin", "tenants/a/x.bin", "tenants/b/x.bin"]
    assert storage.delete_prefix("tenants/a/") == 2
    storage.delete("tenants/b/x.bin")
    storage.delete("tenants/b/x.bin")  # deleting a missing key is not an error
    assert list(storage.list("tenants/")) == []
    with pytest.raises(BlobNotFound):
        storage.get_bytes("tenants/b/x.bin")
    storage.check()


def test_large_object_goes_up_in_parts_and_comes_back(storage, tmp_path):
    import io

    data = bytes(range(256)) * (80 * 1024)  # 20 MiB, over the 16 MiB multipart threshold
    storage.put_file("big/object.bin", io.BytesIO(data))
    out = tmp_path / "out.bin"
    storage.download("big/object.bin", str(out))
    assert out.read_bytes() == data


def test_keys_cannot_escape(storage):
    for bad in ("../x", "/abs", "a/../../b", "a//b", ""):
        with pytest.raises(ValueError):
            storage.put_bytes(bad, b"x")


def test_presigned_url_downloads_without_credentials(s3_storage):
    s3_storage.put_bytes("p/q.txt", b"presigned")
    url = s3_storage.presigned_url("p/q.txt", expires_seconds=60)
    assert httpx.get(url).content == b"presigned"
    assert httpx.get(url.split("?")[0]).status_code in (401, 403)


def test_wrong_secret_is_refused(s3_server, s3_storage):
    s3_storage.put_bytes("secret/x", b"x")
    wrong = S3Storage(
        endpoint=s3_server["endpoint"], bucket=s3_storage.bucket, access_key=s3_server["access_key"], secret_key="wrong"
    )
    with pytest.raises(StorageError, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        wrong.get_bytes("secret/x")
    with pytest.raises(StorageError):
        wrong.check()
