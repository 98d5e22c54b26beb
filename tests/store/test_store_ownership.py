"""The store moves and deletes only what it wrote, keeps a replaced version for its readers, serves a version
by its digest, and commits on S3 only over the manifest it started from."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.store import (
    MANIFEST_NAME,
    LeaseLostError,
    LocalStore,
    NotFoundError,
    S3Store,
    StoreError,
    manifest_digest,
    open_store,
)
from pipeline.store.manifest import LEGACY_MANIFEST_FORMAT, file_entry
from tests.store.test_checkpoint_store import make_checkpoint_dir, raw_keys, tree_bytes


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    moto_server = request.getfixturevalue("moto_server")
    bucket = moto_server.create_bucket()
    return open_store(f"s3://{bucket}/runs/r1", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "cache")


def other_view(store, tmp_path, name="other"):
    """Another run's store object on the same store (its own client, cache and leases)."""
    return open_store(store.uri, endpoint_url=getattr(store, "endpoint_url", None), cache_dir=tmp_path / name)


def test_run_name_dot_dot_cannot_reach_a_users_folder(tmp_path):
    """The review's case: storage.uri=$T/artifacts run_name=.. made the run's root $T, and a put of 'teacher'
    moved the user's $T/teacher into the store and pruned it. Now the name is refused, and a store opened
    on the user's folder anyway refuses to touch what it did not write."""
    from pipeline.config import ConfigError, RunConfig

    for bad in ("..", ".", "../x", "a/b", "/abs", "-x", ".hidden", "x" * 101, "a b", ""):
        with pytest.raises(ConfigError, match="run_name must be one name of letters"):
            RunConfig(run_name=bad)
    precious = tmp_path / "teacher" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("the user's")
    store = open_store(tmp_path, cache_dir=tmp_path / ".cache-store")
    store.retain_seconds = 0
    source = make_checkpoint_dir(tmp_path / "src")
    with pytest.raises(StoreError, match=r"teacher is a folder without a manifest of the store: .*nothing was "
                                         r"changed") as error:
        store.put_checkpoint(source, "teacher", config_digest="c")
    assert "\n" not in str(error.value)
    assert precious.read_text() == "the user's" and not (tmp_path / ".versions").exists()


@pytest.mark.parametrize("kind", ["file", "link elsewhere"])
def test_a_users_file_or_link_at_a_checkpoint_name_is_refused(tmp_path, kind):
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    (tmp_path / "store").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    if kind == "file":
        (tmp_path / "store" / "H-2").write_text("mine")
    else:
        os.symlink(target, tmp_path / "store" / "H-2")
    with pytest.raises(StoreError, match="never moves or deletes what it did not write"):
        store.put_checkpoint(make_checkpoint_dir(tmp_path / "src"), "H-2", config_digest="c")
    if kind == "file":
        assert (tmp_path / "store" / "H-2").read_text() == "mine"
    else:
        assert os.readlink(tmp_path / "store" / "H-2") == str(target) and (target / "keep.txt").is_file()


def test_an_older_layout_checkpoint_becomes_a_retired_version(tmp_path):
    """A real folder with the store's own (older-layout) manifest is the store's: the next put keeps it as a
    retired version, readable by its digest until it is due, then pruned."""
    root = tmp_path / "store"
    legacy = make_checkpoint_dir(root / "H-2")
    entries = [file_entry(legacy / path, path).to_dict() for path in sorted(tree_bytes(legacy))]
    manifest = {"format": LEGACY_MANIFEST_FORMAT, "name": "H-2", "config_digest": "old", "parent": None,
                "created": "2026-01-01T00:00:00Z", "total_size": 0, "files": entries, "metadata": {}}
    (legacy / MANIFEST_NAME).write_text(json.dumps(manifest))
    old_tree = tree_bytes(legacy)
    store = open_store(root, cache_dir=tmp_path / "cache")
    assert store.has_checkpoint("H-2")
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "new", seed=4), "H-2", config_digest="new")
    assert (root / "H-2").is_symlink()
    assert tree_bytes(store.get_checkpoint("H-2", digest=manifest_digest(manifest))) == old_tree
    store.retain_seconds = 0
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "newer", seed=5), "H-2", config_digest="newer")
    assert [path.name for path in (root / ".versions" / "H-2").iterdir()] == [store.manifest("H-2")["version"]]


def test_prune_never_deletes_what_the_store_did_not_write(store, moto_server_if_s3, tmp_path):
    store.retain_seconds = 0
    source = make_checkpoint_dir(tmp_path / "src")
    store.put_checkpoint(source, "H-2", config_digest="c")
    if isinstance(store, LocalStore):  # a folder beside the versions that no marker or manifest claims
        foreign = store.root / ".versions" / "H-2" / "v-20260101T000000-0000abcd"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("not the store's")
    else:
        client = moto_server_if_s3.client()
        for key in ("H-2/v-20260101T000000-0000abcd/notes.txt", "H-2/mine/notes.txt", "H-2/notes.txt"):
            client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=b"not the store's")
    for seed in (1, 2):
        store.put_checkpoint(make_checkpoint_dir(tmp_path / f"src{seed}", seed=seed), "H-2", config_digest=f"c{seed}")
    if isinstance(store, LocalStore):
        assert (foreign / "notes.txt").read_text() == "not the store's"
    else:
        kept = [key for key in raw_keys(store, moto_server_if_s3) if key.endswith("notes.txt")]
        assert kept == ["runs/r1/H-2/mine/notes.txt", "runs/r1/H-2/notes.txt",
                        "runs/r1/H-2/v-20260101T000000-0000abcd/notes.txt"]


@pytest.fixture
def moto_server_if_s3(request, store):
    return request.getfixturevalue("moto_server") if isinstance(store, S3Store) else None


def test_a_readers_folder_outlives_a_re_put_by_another_run(store, tmp_path):
    """The review's case: a reader's folder was deleted as soon as another run committed a new version."""
    first = make_checkpoint_dir(tmp_path / "v1", seed=1)
    store.put_checkpoint(first, "H-2", config_digest="v1")
    folder = store.get_checkpoint("H-2")
    writer = other_view(store, tmp_path)
    writer.put_checkpoint(make_checkpoint_dir(tmp_path / "v2", seed=2), "H-2", config_digest="v2")
    writer.put_checkpoint(make_checkpoint_dir(tmp_path / "v3", seed=3), "H-2", config_digest="v3")
    assert tree_bytes(folder) == tree_bytes(first)  # retained: retired for less than retain_seconds


def test_a_held_version_is_not_pruned_until_its_reader_lets_go(tmp_path):
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    first = make_checkpoint_dir(tmp_path / "v1", seed=1)
    store.put_checkpoint(first, "H-2", config_digest="v1")
    writer = other_view(store, tmp_path)
    writer.retain_seconds = 0  # prunes whatever is retired, at once
    with store.hold("H-2") as folder:
        for seed in (2, 3):
            writer.put_checkpoint(make_checkpoint_dir(tmp_path / f"v{seed}", seed=seed), "H-2", config_digest=f"{seed}")
        assert tree_bytes(folder) == tree_bytes(first)
    writer.put_checkpoint(make_checkpoint_dir(tmp_path / "v4", seed=4), "H-2", config_digest="4")
    assert not folder.exists()  # let go of: pruned by the next put


def test_a_version_is_served_by_its_digest_after_another_run_re_puts(store, tmp_path):
    """The review's case: an input keyed on version 1 was served version 2, which another run committed."""
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "v1", seed=1), "H-2", config_digest="k1")
    digest = store.manifest_digest("H-2")
    other_view(store, tmp_path).put_checkpoint(make_checkpoint_dir(tmp_path / "v2", seed=2), "H-2",
                                               config_digest="v2-from-another-run")
    reader = other_view(store, tmp_path, "reader")
    folder = reader.get_checkpoint("H-2", digest=digest)
    assert json.loads((folder / MANIFEST_NAME).read_text())["config_digest"] == "k1"
    assert tree_bytes(folder) == tree_bytes(tmp_path / "v1")
    with reader.hold("H-2", digest=digest) as held:
        assert json.loads((held / MANIFEST_NAME).read_text())["config_digest"] == "k1"
    with pytest.raises(NotFoundError, match="no longer holds the version"):
        reader.get_checkpoint("H-2", digest="0" * 64)


def test_s3_commit_over_another_runs_commit_is_refused(moto_server, s3_bucket, tmp_path, monkeypatch):
    """Between the lease check and the manifest PUT another run commits: the conditional PUT refuses ours."""
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=moto_server.endpoint_url, cache_dir=tmp_path / "c")
    store.put_checkpoint(make_checkpoint_dir(tmp_path / "v1", seed=1), "H-2", config_digest="v1")
    real_commit = S3Store._commit
    ours: list[str] = []

    def another_run_commits_first(self, name, version, manifest):
        if not ours:
            ours.append(version)
            theirs = dict(self.manifest("H-2"), config_digest="other-run")
            moto_server.client().put_object(Bucket=s3_bucket, Key="p/H-2/manifest.json",
                                            Body=json.dumps(theirs).encode())
        return real_commit(self, name, version, manifest)

    monkeypatch.setattr(S3Store, "_commit", another_run_commits_first)
    with pytest.raises(LeaseLostError, match="was committed by another run while this one wrote it") as error:
        store.put_checkpoint(make_checkpoint_dir(tmp_path / "v2", seed=2), "H-2", config_digest="late")
    assert "\n" not in str(error.value)
    assert store.manifest("H-2")["config_digest"] == "other-run"  # theirs stands
    assert not [key for key in raw_keys(store, moto_server) if f"/{ours[0]}/" in key], "the refused version is gone"
