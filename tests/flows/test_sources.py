"""A teacher given as an s3:// URI is downloaded once into the cache: a plain prefix of files, or a
checkpoint of one of our stores (hashes verified)."""

from __future__ import annotations

import hashlib
import json

import pytest

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


def test_local_teacher_fetches_once(moto_server, s3_bucket, tmp_path):
    client = moto_server.client()
    client.put_object(Bucket=s3_bucket, Key="t/config.json", Body=b"{}")
    remote = local_teacher(f"s3://{s3_bucket}/t", tmp_path, moto_server.endpoint_url)
    assert remote.local.parent == tmp_path / "teachers"
    assert remote.fetch() == remote.local and (remote.local / "config.json").is_file()
    client.delete_object(Bucket=s3_bucket, Key="t/config.json")
    assert remote.fetch() == remote.local  # already complete: no second download
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
