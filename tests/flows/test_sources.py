"""A teacher given as an s3:// URI is downloaded once into the cache: a plain prefix of files, or a
checkpoint of one of our stores (hashes verified)."""

from __future__ import annotations

import hashlib
import json

import pytest

from flows import sources
from flows.sources import download_folder, local_teacher
from pipeline.store import StoreError, open_store


def test_plain_prefix_and_store_checkpoint_download(moto_server, s3_bucket, tmp_path):
    client = moto_server.client()
    for name, body in {"config.json": b"{}", "sub/tokenizer.json": b"[1, 2]"}.items():
        client.put_object(Bucket=s3_bucket, Key=f"models/plain/{name}", Body=body)
    plain = download_folder(f"s3://{s3_bucket}/models/plain", tmp_path / "plain",
                            endpoint_url=moto_server.endpoint_url)
    assert (plain / "config.json").read_bytes() == b"{}"
    assert (plain / "sub" / "tokenizer.json").read_bytes() == b"[1, 2]"

    source = tmp_path / "source"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "nested" / "weights.bin").write_bytes(b"\0" * 1000)
    store = open_store(f"s3://{s3_bucket}/store", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "c")
    store.put_checkpoint(source, "teacher", config_digest="x")
    folder = download_folder(f"s3://{s3_bucket}/store/teacher", tmp_path / "checkpoint",
                             endpoint_url=moto_server.endpoint_url)
    assert (folder / "nested" / "weights.bin").read_bytes() == b"\0" * 1000
    assert (folder / "manifest.json").is_file()  # came through the store, verified

    with pytest.raises(StoreError, match="nothing at"):
        download_folder(f"s3://{s3_bucket}/models/none", tmp_path / "none", endpoint_url=moto_server.endpoint_url)


def test_local_teacher_fetches_once(moto_server, s3_bucket, tmp_path, monkeypatch):
    client = moto_server.client()
    client.put_object(Bucket=s3_bucket, Key="t/config.json", Body=b"{}")
    remote = local_teacher(f"s3://{s3_bucket}/t", tmp_path, moto_server.endpoint_url)
    assert remote.local.parent == tmp_path / "teachers"
    assert remote.fetch() == remote.local and (remote.local / "config.json").is_file()
    again = local_teacher(f"s3://{s3_bucket}/t", tmp_path, moto_server.endpoint_url)

    def no_second_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(sources, "download_folder", no_second_download)
    assert again.local == remote.local and again.fetch() == remote.local  # the same content: no second download
    assert local_teacher("/models/llama", tmp_path) is None
    assert local_teacher(None, tmp_path) is None
    file_teacher = local_teacher(f"file://{tmp_path}/models/llama", tmp_path)
    assert file_teacher.local == tmp_path / "models" / "llama" and file_teacher.fetch() == file_teacher.local


def test_teacher_download_is_verified_and_installed_in_one_step(moto_server, s3_bucket, tmp_path):
    client = moto_server.client()
    client.put_object(Bucket=s3_bucket, Key="t/config.json", Body=b'{"v": 1}')
    client.put_object(Bucket=s3_bucket, Key="t/model.safetensors", Body=b"\1" * 5000)
    destination = tmp_path / "teachers" / "t"
    first = download_folder(f"s3://{s3_bucket}/t", destination, endpoint_url=moto_server.endpoint_url)
    assert first == destination and destination.is_symlink()
    manifest = json.loads((destination / "manifest.json").read_text())
    assert {entry["path"]: entry["sha256"] for entry in manifest["files"]} == {
        "config.json": hashlib.sha256(b'{"v": 1}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"\1" * 5000).hexdigest(),
    }
    old_target = destination.resolve()

    # new content at the URI: a new verified copy, and the link switches to it (the old copy is untouched)
    client.put_object(Bucket=s3_bucket, Key="t/config.json", Body=b'{"v": 2}')
    download_folder(f"s3://{s3_bucket}/t", destination, endpoint_url=moto_server.endpoint_url)
    assert (destination / "config.json").read_bytes() == b'{"v": 2}' and destination.resolve() != old_target
    assert (old_target / "config.json").read_bytes() == b'{"v": 1}'
    assert not [path for path in destination.parent.iterdir() if path.name.startswith(".t.")], "no debris"


def test_object_names_that_escape_the_folder_are_refused(moto_server, s3_bucket, tmp_path):
    client = moto_server.client()
    client.put_object(Bucket=s3_bucket, Key="t/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="t/sub/..%2F..%2Fescape", Body=b"x")
    with pytest.raises(StoreError, match="invalid object name"):
        download_folder(f"s3://{s3_bucket}/t", tmp_path / "teachers" / "t", endpoint_url=moto_server.endpoint_url)
    assert not list(tmp_path.rglob("escape"))


def test_a_teacher_uploaded_again_to_the_same_prefix_is_fetched_again(moto_server, s3_bucket, tmp_path):
    """The review's case: the copy was named after the URI, so a re-uploaded teacher got a new key and was
    then trained from the old weights."""
    from flows.sources import teacher_source

    client = moto_server.client()
    client.put_object(Bucket=s3_bucket, Key="t2/config.json", Body=b'{"v": 1}')
    first = teacher_source(f"s3://{s3_bucket}/t2", tmp_path, moto_server.endpoint_url)
    assert (first.fetch() / "config.json").read_bytes() == b'{"v": 1}'
    client.put_object(Bucket=s3_bucket, Key="t2/config.json", Body=b'{"v": 2}')
    second = teacher_source(f"s3://{s3_bucket}/t2", tmp_path, moto_server.endpoint_url)
    assert second.digest != first.digest
    assert (second.fetch() / "config.json").read_bytes() == b'{"v": 2}'
    # planned with one content, fetched after another upload: refused, never the other weights
    stale = teacher_source(f"s3://{s3_bucket}/t2", tmp_path / "fresh-cache", moto_server.endpoint_url)
    client.put_object(Bucket=s3_bucket, Key="t2/config.json", Body=b'{"v": 3}')
    with pytest.raises(StoreError, match="changed while it was fetched"):
        stale.fetch()


def test_s3_errors_while_reading_a_teacher_are_one_line(moto_server, s3_bucket, tmp_path):
    """Reading a teacher's files went straight to boto3: its errors came out raw (a traceback)."""
    from flows.sources import teacher_source
    from pipeline.store import BucketNotFoundError, NotFoundError

    with pytest.raises(BucketNotFoundError, match="S3 bucket 'no-such-teacher-bucket' does not exist"):
        teacher_source("s3://no-such-teacher-bucket/t", tmp_path, moto_server.endpoint_url)
    moto_server.client().put_object(Bucket=s3_bucket, Key="t3/config.json", Body=b"{}")
    source = teacher_source(f"s3://{s3_bucket}/t3", tmp_path, moto_server.endpoint_url)
    with pytest.raises(NotFoundError, match=rf"no object s3://{s3_bucket}/t3/tokenizer_config.json") as error:
        source.read("tokenizer_config.json")
    assert "\n" not in str(error.value)


def test_a_checkpoint_of_our_store_as_teacher_is_listed_by_its_manifest(moto_server, s3_bucket, tmp_path):
    from flows.sources import teacher_source
    from pipeline.executor import content_digest

    source = tmp_path / "source"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "nested" / "weights.bin").write_bytes(b"\0" * 100)
    store = open_store(f"s3://{s3_bucket}/ours", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "c")
    store.put_checkpoint(source, "teacher", config_digest="x")
    teacher = teacher_source(f"s3://{s3_bucket}/ours/teacher", tmp_path, moto_server.endpoint_url)
    assert teacher.files == ("config.json", "nested/weights.bin")  # not the version folder's object names
    assert teacher.read("config.json") == b'{"a": 1}'
    assert teacher.digest == content_digest(store.manifest("teacher"))
    assert (teacher.fetch() / "nested" / "weights.bin").read_bytes() == b"\0" * 100
