"""The S3 store through a fault-injecting proxy (tests/fault_proxy.py) in front of the real moto server:
dropped connections, stalls, 500/503/SlowDown answers, truncated and corrupted bodies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_proxy import FaultPlan, FaultProxy
from pipeline.store import IntegrityError, S3TransferOptions, StoreError, open_store

MiB = 1024 * 1024

# Short timeouts so a stalled request fails in about a second; enough attempts to ride out a 30% fault rate.
FAST_RETRIES = S3TransferOptions(
    multipart_threshold=5 * MiB,
    multipart_chunksize=5 * MiB,
    max_concurrency=2,
    max_attempts=4,
    transfer_attempts=6,
    backoff_seconds=0.05,
    connect_timeout=1.0,
    read_timeout=1.0,
)


def make_source(root: Path, seed: int, big: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = __import__("random").Random(seed)
    (root / "config.json").write_text(f'{{"seed": {seed}}}')
    (root / "model.safetensors").write_bytes(rng.randbytes(300_000))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_bytes(rng.randbytes(2_000))
    if big:  # a multipart upload and a ranged, multi-part download
        (root / "optimizer.bin").write_bytes(rng.randbytes(6 * MiB))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


@pytest.fixture
def proxy(moto_server):
    with FaultProxy(moto_server.endpoint_url) as fault_proxy:
        yield fault_proxy


def proxied_store(proxy: FaultProxy, bucket: str, cache: Path):
    return open_store(f"s3://{bucket}/run", endpoint_url=proxy.endpoint_url, cache_dir=cache, transfer=FAST_RETRIES)


def test_transfers_finish_through_random_faults(proxy, s3_bucket, tmp_path):
    proxy.plan = FaultPlan(rate=0.3, seed=7)
    proxy.random.seed(7)
    store = proxied_store(proxy, s3_bucket, tmp_path / "cache")
    sources = {name: make_source(tmp_path / name, seed, big=(name == "H-2")) for seed, name in enumerate(["H-2", "H-3"])}
    for name, source in sources.items():
        store.put_checkpoint(source, name, config_digest=name)
    reader = proxied_store(proxy, s3_bucket, tmp_path / "reader-cache")
    for name, source in sources.items():
        assert tree(reader.get_checkpoint(name)) == tree(source)
    kinds = {key for key in proxy.stats if key.startswith("fault.")}
    print(dict(proxy.stats))
    assert proxy.stats["faults"] >= 5 and len(kinds) >= 3, dict(proxy.stats)


def test_interrupted_upload_never_yields_a_manifest(proxy, s3_bucket, tmp_path):
    store = proxied_store(proxy, s3_bucket, tmp_path / "cache")
    first = make_source(tmp_path / "first", 1)
    store.put_checkpoint(first, "H-2", config_digest="first")
    committed = store.manifest("H-2")

    for cut in range(2, 9, 3):  # the network goes away after a few requests of the re-put
        proxy.stats.clear()
        proxy.fail_after = cut
        with pytest.raises(StoreError):
            store.put_checkpoint(make_source(tmp_path / f"second-{cut}", 10 + cut), "H-2", config_digest="second")
        proxy.fail_after = None
        assert store.manifest("H-2") == committed, "the last good checkpoint must stay committed"
    assert tree(proxied_store(proxy, s3_bucket, tmp_path / "fresh").get_checkpoint("H-2")) == tree(first)

    proxy.fail_after = 3  # a first put cut off: no checkpoint at all
    with pytest.raises(StoreError):
        store.put_checkpoint(make_source(tmp_path / "new", 5), "H-9", config_digest="x")
    proxy.fail_after = None
    assert not store.has_checkpoint("H-9")


def test_corrupted_object_is_fetched_again_or_reported(proxy, s3_bucket, tmp_path):
    store = proxied_store(proxy, s3_bucket, tmp_path / "cache")
    source = make_source(tmp_path / "source", 3)
    store.put_checkpoint(source, "H-2", config_digest="c")
    path = f"/{s3_bucket}/run/H-2/{store.manifest('H-2')['version']}/model.safetensors"

    proxy.corrupt_keys[path] = 1  # corrupted once in transit or by a flaky server: fetched again
    assert tree(store.get_checkpoint("H-2")) == tree(source)
    assert proxy.stats["fault.corrupt"] == 1
    assert [entry[1] for entry in proxy.log if entry[0] == "GET"].count(path) == 2

    proxy.corrupt_keys[path] = 100  # stays wrong: reported in one line, nothing cached
    other = proxied_store(proxy, s3_bucket, tmp_path / "other-cache")
    with pytest.raises(IntegrityError, match=r"model.safetensors' has sha256 .* \(downloaded 2 times\)") as error:
        other.get_checkpoint("H-2")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "other-cache").glob("H-2-*"))
    assert os.listdir(tmp_path / "other-cache" / ".partial") == []
