"""pipeline.store against a local folder and a real S3 server (moto_server over HTTP)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.store import (
    MANIFEST_NAME,
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointRef,
    EndpointUnreachableError,
    IntegrityError,
    LeaseHeldError,
    LeaseLostError,
    LocalStore,
    NotFoundError,
    S3Store,
    S3TransferOptions,
    StoreError,
    UnsupportedURIError,
    config_digest,
    open_store,
    split_checkpoint_uri,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------------
# helpers


def make_checkpoint_dir(root: Path, seed: int = 0) -> Path:
    """A checkpoint-like folder: nested files, a binary blob, an empty file, a name with a space."""
    root.mkdir(parents=True)
    rng = random.Random(seed)
    files = {
        "config.json": json.dumps({"layers": 4, "seed": seed}).encode(),
        "model/weights.bin": bytes(rng.getrandbits(8) for _ in range(100_000)),
        "model/shards/part 0.bin": bytes(rng.getrandbits(8) for _ in range(3_000)),
        "tokenizer/empty.txt": b"",
    }
    for relative_path, data in files.items():
        (root / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (root / relative_path).write_bytes(data)
    return root


def tree_bytes(root: Path, *, skip_manifest: bool = True) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not (skip_manifest and path.relative_to(root).as_posix() == MANIFEST_NAME)
    }


def raw_keys(store: S3Store, moto_server) -> list[str]:
    response = moto_server.client().list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(item["Key"] for item in response.get("Contents", []))


def plant_object(store, key: str, data: bytes, moto_server=None) -> None:
    """Writes bytes behind the store's back (a crashed writer, a corrupted disk or object)."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        moto_server.client().put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)


def count_get_objects(store: S3Store) -> list[str]:
    """Records the key of every GetObject call the store's client makes from now on."""
    keys: list[str] = []

    def record(params, **_):
        keys.append(params["Key"])

    store.client.meta.events.register("before-parameter-build.s3.GetObject", record)
    return keys


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    moto_server = request.getfixturevalue("moto_server")
    bucket = moto_server.create_bucket()
    return open_store(f"s3://{bucket}/runs/r1", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache")


@pytest.fixture
def moto(request, store):
    """The moto server if the store is an S3 one."""
    return request.getfixturevalue("moto_server") if isinstance(store, S3Store) else None


# ----------------------------------------------------------------------------------------------------
# digests and URIs


def test_config_digest_is_canonical():
    @dataclasses.dataclass
    class Train:
        lr: float
        steps: int

    base = {"model": {"layers": 4, "pattern": ["attention", "mamba"]}, "train": Train(1e-3, 10), "path": Path("/x")}
    reordered = {
        "path": "/x",
        "train": {"steps": 10, "lr": 1e-3},
        "model": {"pattern": ["attention", "mamba"], "layers": 4},
    }
    assert config_digest(base) == config_digest(reordered)
    assert len(config_digest(base)) == 64 and int(config_digest(base), 16) >= 0
    assert config_digest(base) != config_digest({**reordered, "train": {"steps": 11, "lr": 1e-3}})
    assert config_digest({"a": [1, 2]}) != config_digest({"a": [2, 1]})
    with pytest.raises(TypeError, match="object"):
        config_digest({"a": object()})


def test_open_store_parses_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = open_store()
    assert isinstance(default, LocalStore) and default.root == tmp_path / "artifacts"
    assert not (tmp_path / "artifacts").exists(), "opening a store must not touch the disk"
    assert open_store(f"file://{tmp_path}/a").root == tmp_path / "a"
    assert open_store("rel/dir").root == tmp_path / "rel" / "dir"
    s3 = open_store("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("H-2") == "s3://bucket/some/prefix/H-2"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    assert open_store("s3://bucket").endpoint_url == "http://minio.local:9000"
    assert split_checkpoint_uri("s3://bucket/p/H-25") == ("s3://bucket/p", "H-25")
    with pytest.raises(UnsupportedURIError, match="unsupported store URI scheme 'gs'"):
        open_store("gs://bucket/prefix")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")


# ----------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(store, moto, tmp_path):
    source = make_checkpoint_dir(tmp_path / "source")
    digest = config_digest({"stage": "convert", "k": 2})
    ref = store.put_checkpoint(source, "H-2", config_digest=digest, metadata={"layer_pattern": ["attention", "mamba"]})

    assert store.has_checkpoint("H-2") and not store.has_checkpoint("H-3")
    assert ref == CheckpointRef("H-2", store.uri_for("H-2"), store.manifest_digest("H-2"), digest)
    assert CheckpointRef.from_dict(ref.to_dict()) == ref

    manifest = store.manifest("H-2")
    expected_files = [
        {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for path, data in tree_bytes(source).items()
    ]
    assert manifest["files"] == expected_files
    assert manifest["config_digest"] == digest and manifest["parent"] is None
    assert manifest["metadata"] == {"layer_pattern": ["attention", "mamba"]}
    version = manifest["version"]
    assert version.startswith("v-")
    assert manifest["total_size"] == sum(entry["size"] for entry in expected_files)
    assert time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")

    local = store.get_checkpoint("H-2")
    assert tree_bytes(local) == tree_bytes(source)
    assert json.loads((local / MANIFEST_NAME).read_text()) == manifest

    if isinstance(store, S3Store):  # the layout in the bucket is the documented one
        assert ref.uri == f"s3://{store.bucket}/runs/r1/H-2"
        assert raw_keys(store, moto) == sorted(
            [*(f"runs/r1/H-2/{version}/{path}" for path in tree_bytes(source)), f"runs/r1/H-2/{MANIFEST_NAME}",
             f"runs/r1/H-2/{version}/.writing", f"runs/r1/H-2/{version}/{MANIFEST_NAME}"]
        )
    else:  # <root>/H-2 is a link to the version folder: the user's path to the checkpoint stays the same
        assert ref.uri == (tmp_path / "store" / "H-2").as_uri()
        assert local == (tmp_path / "store" / ".versions" / "H-2" / version)
        assert tree_bytes(tmp_path / "store" / "H-2") == tree_bytes(source)

    # parents: a ref, a committed name, a URI elsewhere; an unknown name is refused
    child = store.put_checkpoint(source, "H-3", config_digest="c", parent=ref)
    assert store.manifest("H-3")["parent"] == {"name": "H-2", "uri": ref.uri, "manifest_digest": ref.manifest_digest}
    store.put_checkpoint(source, "H-4", config_digest="c", parent="H-2")
    assert store.manifest("H-4")["parent"] == store.manifest("H-3")["parent"]
    store.put_checkpoint(source, "H-5", config_digest="c", parent="hf://org/model")
    assert store.manifest("H-5")["parent"]["uri"] == "hf://org/model"
    with pytest.raises(NotFoundError, match="no checkpoint 'H-9'"):
        store.put_checkpoint(source, "H-6", config_digest="c", parent="H-9")
    assert store.ref("H-3") == child


def test_put_replaces_previous_version(store, moto, tmp_path):
    first = make_checkpoint_dir(tmp_path / "v1", seed=1)
    (first / "only-in-v1.txt").write_text("old")
    store.put_checkpoint(first, "H-2", config_digest="v1")
    old_digest = store.manifest_digest("H-2")
    store.get_checkpoint("H-2")
    second = make_checkpoint_dir(tmp_path / "v2", seed=2)
    store.put_checkpoint(second, "H-2", config_digest="v2")

    assert store.manifest_digest("H-2") != old_digest
    assert tree_bytes(store.get_checkpoint("H-2")) == tree_bytes(second)
    # the replaced version stays readable, by its digest, for retain_seconds (a reader may still use it)
    assert tree_bytes(store.get_checkpoint("H-2", digest=old_digest)) == tree_bytes(first)
    # once it has been retired that long, the next put removes it (and this one, retired by that put)
    store.retain_seconds = 0
    store.put_checkpoint(first, "H-2", config_digest="v3")
    with pytest.raises(NotFoundError, match="no longer holds the version"):
        open_store(store.uri, endpoint_url=getattr(store, "endpoint_url", None),
                   cache_dir=tmp_path / "fresh").get_checkpoint("H-2", digest=old_digest)
    if isinstance(store, S3Store):
        assert [key for key in raw_keys(store, moto) if "/v-" in key] == sorted(
            f"runs/r1/H-2/{store.manifest('H-2')['version']}/{path}"
            for path in [*tree_bytes(first), ".writing", MANIFEST_NAME])
    else:
        assert [path.name for path in (store.root / ".versions" / "H-2").iterdir()] == [store.manifest("H-2")["version"]]


def test_invalid_names_and_reserved_manifest(store, tmp_path):
    source = make_checkpoint_dir(tmp_path / "source")
    for bad in ["../x", "a/b", ".hidden", ""]:
        with pytest.raises(ValueError, match="invalid checkpoint name"):
            store.put_checkpoint(source, bad, config_digest="c")
    (source / MANIFEST_NAME).write_text("{}")
    with pytest.raises(StoreError, match="written by the store"):
        store.put_checkpoint(source, "H-2", config_digest="c")


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pipeline import store as store_module

    uri, endpoint, cache, source = sys.argv[1:5]
    store = store_module.open_store(uri, endpoint_url=endpoint or None, cache_dir=cache)

    def die(*args, **kwargs):  # like a killed process: no finally blocks, no cleanup
        os._exit(17)

    type(store)._commit = die
    store.put_checkpoint(source, "H-2", config_digest="crashed")
    """
)


def crash_while_putting(store, source: Path) -> None:
    endpoint = store.endpoint_url if isinstance(store, S3Store) else ""
    result = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, store.uri, endpoint, str(store.cache_dir), str(source)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 17, result.stderr


def test_crash_before_manifest_leaves_no_checkpoint(store, moto, tmp_path):
    source = make_checkpoint_dir(tmp_path / "source")
    crash_while_putting(store, source)

    # the files were written, the manifest was not
    if isinstance(store, S3Store):
        keys = raw_keys(store, moto)
        assert any(key.endswith("/model/weights.bin") for key in keys) and "runs/r1/H-2/manifest.json" not in keys
    else:
        staged = list((store.root / ".versions").glob("H-2/v-*/model/weights.bin"))
        assert len(staged) == 1 and not (store.root / "H-2").exists()
    assert not store.has_checkpoint("H-2")
    with pytest.raises(NotFoundError, match="no checkpoint 'H-2'"):
        store.get_checkpoint("H-2")

    ref = store.put_checkpoint(source, "H-2", config_digest="ok")  # a re-put simply works
    assert store.has_checkpoint("H-2") and ref.config_digest == "ok"
    assert tree_bytes(store.get_checkpoint("H-2")) == tree_bytes(source)

    # A crash while replacing a committed checkpoint leaves the last good version committed and whole
    # (its files are not touched: the new version was uploaded beside it); the next put prunes the debris.
    committed = store.manifest("H-2")
    replacement = make_checkpoint_dir(tmp_path / "replacement", seed=5)
    crash_while_putting(store, replacement)
    assert store.manifest("H-2") == committed
    fresh = open_store(store.uri, endpoint_url=getattr(store, "endpoint_url", None), cache_dir=tmp_path / "fresh")
    assert tree_bytes(fresh.get_checkpoint("H-2")) == tree_bytes(source)
    store.retain_seconds = 0  # the replaced version goes at once too
    store.put_checkpoint(replacement, "H-2", config_digest="new")
    version = store.manifest("H-2")["version"]
    if isinstance(store, S3Store):
        assert all(key.startswith(f"runs/r1/H-2/{version}/") for key in raw_keys(store, moto) if "/v-" in key)
    else:
        assert [path.name for path in (store.root / ".versions" / "H-2").iterdir()] == [version]


def test_partial_or_garbled_checkpoint_is_not_reported(store, moto, tmp_path):
    # files without a manifest (a writer from elsewhere died), and a manifest that does not parse
    plant_object(store, "H-2/model/weights.bin", b"partial", moto)
    plant_object(store, "H-3/model/weights.bin", b"partial", moto)
    plant_object(store, f"H-3/{MANIFEST_NAME}", b'{"files": [', moto)
    assert not store.has_checkpoint("H-2") and not store.has_checkpoint("H-3")
    with pytest.raises(IntegrityError, match="does not parse"):
        store.manifest("H-3")

    source = make_checkpoint_dir(tmp_path / "source")
    (source / "model" / "weights.bin").unlink()
    if isinstance(store, LocalStore):
        # a folder at a checkpoint's place that the store cannot show it wrote (no manifest of its own) is
        # never moved or deleted: the put is refused in one line, before anything is written
        for name in ("H-2", "H-3"):
            with pytest.raises(StoreError, match=rf"{name} is a folder without a manifest of the store: .* never "
                                                 "moves or deletes what it did not write") as error:
                store.put_checkpoint(source, name, config_digest="c")
            assert "\n" not in str(error.value)
            assert (store.root / name / "model" / "weights.bin").read_bytes() == b"partial"
        assert not (store.root / ".versions").exists()
        return
    # S3: the store's own objects live under version prefixes; the others' are left where they are
    for name in ("H-2", "H-3"):
        store.put_checkpoint(source, name, config_digest="c")
        assert tree_bytes(store.get_checkpoint(name)) == tree_bytes(source)
    assert [key for key in raw_keys(store, moto) if key.endswith("model/weights.bin")] == [
        "runs/r1/H-2/model/weights.bin", "runs/r1/H-3/model/weights.bin"]


# ----------------------------------------------------------------------------------------------------
# integrity and caching


def test_corrupted_s3_object_is_detected(moto_server, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache")
    source = make_checkpoint_dir(tmp_path / "source")
    store.put_checkpoint(source, "H-2", config_digest="c")
    original = (source / "model" / "weights.bin").read_bytes()

    flipped = bytes([original[0] ^ 0xFF]) + original[1:]  # same size, different content
    key = f"p/H-2/{store.manifest('H-2')['version']}/model/weights.bin"
    moto_server.client().put_object(Bucket=s3_bucket, Key=key, Body=flipped)
    with pytest.raises(IntegrityError) as error:
        store.get_checkpoint("H-2")
    message = str(error.value)
    assert "\n" not in message and "model/weights.bin" in message and "sha256" in message
    assert "downloaded 2 times" in message  # fetched again before it is reported
    assert not list((tmp_path / "cache").glob("H-2-*")), "a failed download must not look cached"

    moto_server.client().put_object(Bucket=s3_bucket, Key=key, Body=original[:-10])
    with pytest.raises(IntegrityError, match=r"model/weights.bin' has size 99990, manifest says 100000"):
        store.get_checkpoint("H-2")


def test_corrupted_local_file_is_detected(tmp_path):
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "source"), "H-2", config_digest="c")
    weights = store.get_checkpoint("H-2") / "model" / "weights.bin"  # hashed once, recorded
    assert store.get_checkpoint("H-2") == weights.parents[1]
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    # some file systems stamp mtimes at a few-ms granularity: make the rewrite visibly later
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(IntegrityError, match="model/weights.bin' has sha256"):
        store.get_checkpoint("H-2")


def test_s3_checkpoint_is_downloaded_once(moto_server, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/p"
    store = open_store(uri, endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache")
    source = make_checkpoint_dir(tmp_path / "source")
    store.put_checkpoint(source, "H-2", config_digest="c")
    data_keys = sorted(f"p/H-2/{store.manifest('H-2')['version']}/{path}" for path in tree_bytes(source))
    gets = count_get_objects(store)

    first = store.get_checkpoint("H-2")
    assert sorted(key for key in gets if not key.endswith(MANIFEST_NAME)) == data_keys
    gets.clear()
    assert store.get_checkpoint("H-2") == first
    assert gets == ["p/H-2/manifest.json"], "a cached checkpoint is only looked up, not downloaded"

    # another process (a fresh store object) with the same cache reuses it too
    other = open_store(uri, endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache")
    other_gets = count_get_objects(other)
    assert other.get_checkpoint("H-2") == first and other_gets == ["p/H-2/manifest.json"]

    # new content under the same name: new manifest digest, new download
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "v2", seed=3), "H-2", config_digest="c2")
    gets.clear()
    second = store.get_checkpoint("H-2")
    data_keys = sorted(f"p/H-2/{store.manifest('H-2')['version']}/{path}" for path in tree_bytes(tmp_path / "v2"))
    assert second != first and sorted(key for key in gets if not key.endswith(MANIFEST_NAME)) == data_keys
    assert tree_bytes(second) == tree_bytes(tmp_path / "v2")


def test_multipart_transfer(moto_server, s3_bucket, tmp_path):
    options = S3TransferOptions(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    store = open_store(
        f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache", transfer=options
    )
    source = tmp_path / "source"
    (source / "model").mkdir(parents=True)
    big = os.urandom(6 * MiB)
    (source / "model" / "weights.bin").write_bytes(big)
    (source / "config.json").write_text("{}")
    parts: list[int] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.UploadPart", lambda params, **_: parts.append(params["PartNumber"])
    )

    store.put_checkpoint(source, "H-2", config_digest="c")

    assert sorted(parts) == [1, 2]
    key = f"p/H-2/{store.manifest('H-2')['version']}/model/weights.bin"
    etag = moto_server.client().head_object(Bucket=s3_bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-2"), f"not a 2-part multipart object: ETag {etag}"
    assert (store.get_checkpoint("H-2") / "model" / "weights.bin").read_bytes() == big


def test_transient_upload_failure_is_retried(moto_server, s3_bucket, tmp_path, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    options = S3TransferOptions(transfer_attempts=3, backoff_seconds=0.01)
    store = open_store(
        f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache", transfer=options
    )
    real_upload = store.client.upload_file
    calls: list[str] = []

    def flaky_upload(filename, bucket, key, **kwargs):
        calls.append(key)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url=moto_server.endpoint_url)
        return real_upload(filename, bucket, key, **kwargs)

    monkeypatch.setattr(store.client, "upload_file", flaky_upload)
    source = make_checkpoint_dir(tmp_path / "source")
    store.put_checkpoint(source, "H-2", config_digest="c")
    assert calls[0] == calls[1] and calls[0].endswith("/config.json")
    assert tree_bytes(store.get_checkpoint("H-2")) == tree_bytes(source)


# ----------------------------------------------------------------------------------------------------
# errors


def test_missing_bucket_is_reported(moto_server, tmp_path):
    store = open_store("s3://no-such-bucket-4f2a/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path)
    source = make_checkpoint_dir(tmp_path / "source")
    for operation in (
        store.check,
        lambda: store.put_checkpoint(source, "H-2", config_digest="c"),
        lambda: store.has_checkpoint("H-2"),
        lambda: store.get_checkpoint("H-2"),
    ):
        with pytest.raises(BucketNotFoundError) as error:
            operation()
        assert "S3 bucket 'no-such-bucket-4f2a' does not exist" in str(error.value)
        assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def moto_server_with_auth(aws_test_credentials, tmp_path_factory):
    """A second moto server that checks credentials (the dummy test key is unknown to it)."""
    from fixtures_servers import start_moto_server

    log_path = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    moto = start_moto_server(log_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield moto
    finally:
        moto.server.stop()


def test_bad_credentials_are_reported(moto_server_with_auth, tmp_path):
    store = open_store("s3://some-bucket/p", endpoint_url=moto_server_with_auth.endpoint_url, cache_dir=tmp_path)
    expected = r"access denied \(InvalidAccessKeyId\) while reading s3://some-bucket/p/H-2/manifest.json"
    with pytest.raises(AccessDeniedError, match=expected) as error:
        store.has_checkpoint("H-2")
    assert "AWS_ACCESS_KEY_ID" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(AccessDeniedError):
        store.put_checkpoint(make_checkpoint_dir(tmp_path / "source"), "H-2", config_digest="c")
    with pytest.raises(AccessDeniedError, match="access denied"):
        store.check()


def test_missing_credentials_are_reported(moto_server, s3_bucket, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # do not wait for an instance-metadata service
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path)
    with pytest.raises(AccessDeniedError, match="no AWS credentials found"):
        store.has_checkpoint("H-2")


def test_unreachable_endpoint_is_reported(tmp_path):
    from fixtures_servers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = S3TransferOptions(max_attempts=2, transfer_attempts=2, backoff_seconds=0.01, connect_timeout=2)
    store = open_store("s3://bucket/p", endpoint_url=endpoint, cache_dir=tmp_path, transfer=options)
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"cannot reach S3 endpoint {endpoint}") as error:
        store.has_checkpoint("H-2")
    assert "\n" not in str(error.value)
    with pytest.raises(EndpointUnreachableError):
        store.put_checkpoint(make_checkpoint_dir(tmp_path / "source"), "H-2", config_digest="c")
    assert time.monotonic() - started < 30


# ----------------------------------------------------------------------------------------------------
# dependencies


def test_store_and_tracking_import_without_boto3_mlflow_or_torch(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        for blocked in ("boto3", "botocore", "s3transfer", "mlflow"):
            sys.modules[blocked] = None  # any import of them now raises ImportError
        import pipeline
        before = set(sys.modules)
        from pipeline.store import open_store
        from pipeline.tracking import NullTracker, Tracker
        assert "torch" not in set(sys.modules) - before, "pipeline.store / pipeline.tracking imported torch"

        root = sys.argv[1]
        import pathlib
        pathlib.Path(root, "src").mkdir()
        pathlib.Path(root, "src", "w.bin").write_bytes(b"abc")
        store = open_store(root + "/store", cache_dir=root + "/cache")
        store.put_checkpoint(root + "/src", "H-1", config_digest="c")
        assert (store.get_checkpoint("H-1") / "w.bin").read_bytes() == b"abc"

        with NullTracker().child("convert", checkpoint="H-1") as run:
            run.log_metrics({"loss": 1.0}, step=0)
        for attempt, needed in ((lambda: open_store("s3://bucket/p").check(), "boto3"), (Tracker, "mlflow")):
            try:
                attempt()
            except ImportError as error:
                assert needed in str(error) and "pip install" in str(error), error
            else:
                raise AssertionError(needed + " missing but no ImportError")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ----------------------------------------------------------------------------------------------------
# write leases: two runs never write the same checkpoint name at once


def second_store(store, tmp_path):
    """Another run's view of the same store (its own client, cache and leases)."""
    return open_store(store.uri, endpoint_url=getattr(store, "endpoint_url", None), cache_dir=tmp_path / "other")


def test_second_writer_fails_naming_the_holder_or_waits(store, tmp_path):
    source = make_checkpoint_dir(tmp_path / "source")
    other = second_store(store, tmp_path)
    with store.lease("H-2"):
        with pytest.raises(LeaseHeldError) as error:
            other.put_checkpoint(source, "H-2", config_digest="other")
        message = str(error.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "H-2" in message and not other.has_checkpoint("H-2")
        store.put_checkpoint(source, "H-2", config_digest="mine")  # the holder writes (re-entrant)
        other.put_checkpoint(source, "H-3", config_digest="other")  # other names are free

    # a writer that waits gets the lease once the holder is done
    released = threading.Event()

    def hold_then_release():
        with store.lease("H-2"):
            released.wait(10)
            time.sleep(0.5)

    holder = threading.Thread(target=hold_then_release)
    holder.start()
    time.sleep(0.5)
    released.set()
    other.lease_wait_seconds = 20
    started = time.monotonic()
    other.put_checkpoint(source, "H-2", config_digest="after")
    holder.join()
    assert other.manifest("H-2")["config_digest"] == "after" and time.monotonic() - started < 15


def plant_lease(store: S3Store, moto_server, record: dict) -> None:
    moto_server.client().put_object(
        Bucket=store.bucket, Key=f"{store.prefix}/.leases/H-2.json", Body=json.dumps(record).encode()
    )


def test_s3_lease_of_a_dead_or_expired_holder_is_taken_over(moto_server, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "c")
    source = make_checkpoint_dir(tmp_path / "source")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    base = {"token": "t", "user": "u", "since": "2026-01-01T00:00:00Z"}

    # a live holder on another machine, within its time to live: refused, with when it expires
    plant_lease(store, moto_server, {**base, "host": "gpu-node-7", "pid": 4242, "ttl_seconds": 600})
    with pytest.raises(LeaseHeldError, match=r"u@gpu-node-7 pid 4242 .*lease expires in \d+s"):
        store.put_checkpoint(source, "H-2", config_digest="c")
    # the same holder, expired: taken over
    plant_lease(store, moto_server, {**base, "host": "gpu-node-7", "pid": 4242, "ttl_seconds": 0})
    store.put_checkpoint(source, "H-2", config_digest="c")
    # a killed process on this machine (its lease still fresh): taken over at once
    plant_lease(store, moto_server, {**base, "host": socket.gethostname(), "pid": int(dead.stdout), "ttl_seconds": 600})
    store.put_checkpoint(source, "H-2", config_digest="c2")
    assert store.manifest("H-2")["config_digest"] == "c2"
    assert not raw_keys_under(moto_server, s3_bucket, "p/.leases/"), "a released lease is deleted"


def raw_keys_under(moto_server, bucket: str, prefix: str) -> list[str]:
    response = moto_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in response.get("Contents", [])]


def test_s3_writer_that_lost_its_lease_does_not_commit(moto_server, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "c")
    source = make_checkpoint_dir(tmp_path / "source")
    store.put_checkpoint(source, "H-2", config_digest="good")
    good = store.manifest("H-2")
    with store.lease("H-2"):  # ... the run stalls past its time to live and another run takes over:
        plant_lease(store, moto_server, {"token": "x", "user": "u", "host": "gpu-node-9", "pid": 1, "ttl_seconds": 600})
        with pytest.raises(LeaseLostError, match=r"now held by u@gpu-node-9 pid 1 .*not committing") as error:
            store.put_checkpoint(make_checkpoint_dir(tmp_path / "late", seed=9), "H-2", config_digest="late")
        assert "\n" not in str(error.value)
    assert store.manifest("H-2") == good  # the late writer committed nothing
    assert raw_keys_under(moto_server, s3_bucket, "p/.leases/"), "another run's lease is not released by us"


# ----------------------------------------------------------------------------------------------------
# keys: nothing escapes the run's prefix


@pytest.mark.parametrize(
    "bad", ["../x", "a/../../x", "/etc/passwd", "a//b", "a\\..\\b", "%2e%2e/x", "a/%2E%2e", "x\x00y", "..%2Fx", ".hidden"]
)
def test_unsafe_paths_in_a_manifest_are_refused(store, moto, tmp_path, bad):
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "source"), "H-2", config_digest="c")
    manifest = store.manifest("H-2")
    manifest["files"][0]["path"] = bad
    raw = json.dumps(manifest).encode()
    if isinstance(store, LocalStore):
        (store.root / "H-2" / MANIFEST_NAME).write_bytes(raw)
    else:
        plant_object(store, f"H-2/{MANIFEST_NAME}", raw, moto)
    with pytest.raises(IntegrityError, match="unsafe file path"):
        store.get_checkpoint("H-2")
    assert not list((tmp_path).rglob("passwd")) and not list(tmp_path.rglob("x"))


def test_unsafe_store_uris_and_names_are_refused(tmp_path):
    for uri in ("s3://bucket/../other", "s3://bucket/p/%2e%2e/q", "s3://bucket/p?versionId=1", "s3://bucket/p#x"):
        with pytest.raises(UnsupportedURIError):
            open_store(uri, endpoint_url="http://127.0.0.1:1")
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    for name in ("..", "../H-2", "H-2/..", "/abs", "a b", "%2e%2e"):
        with pytest.raises(ValueError, match="invalid checkpoint name"):
            store.put_checkpoint(make_checkpoint_dir(tmp_path / f"s{abs(hash(name))}"), name, config_digest="c")


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pipeline.store import StoreError, open_store

    root, source = sys.argv[1:3]
    store = open_store(root + "/store", cache_dir=root + "/cache")
    store.put_checkpoint(source, "H-2", config_digest="old")  # a committed version, written with room to spare
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # from now on no file may grow past 50 kB
    try:
        store.put_checkpoint(source, "H-2", config_digest="new")
    except StoreError as error:
        print(error)
    """
)


def test_disk_full_during_a_put_keeps_the_last_checkpoint(tmp_path):
    """The file system refuses to grow a file half-way through a put (as a full disk does): one line, the
    committed version untouched, the unfinished one removed."""
    source = make_checkpoint_dir(tmp_path / "source")  # weights.bin is 100 kB
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path), str(source)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60,
    )
    message = result.stdout.strip()
    assert result.returncode == 0 and "\n" not in message, result.stderr
    assert message.startswith("could not write checkpoint ") and "File too large while writing" in message
    assert "free space" in message
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    assert store.manifest("H-2")["config_digest"] == "old"
    assert tree_bytes(store.get_checkpoint("H-2")) == tree_bytes(source)
    assert len(list((tmp_path / "store" / ".versions" / "H-2").iterdir())) == 1, "the unfinished version is gone"
