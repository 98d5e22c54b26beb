"""A teacher given as an s3:// URI is downloaded once into the cache: a plain prefix of files, or a
checkpoint of one of our stores (hashes verified)."""

from __future__ import annotations

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
