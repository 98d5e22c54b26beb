"""Runs that share a store or a run name: a stage computes from the very input version its key was computed
from, and each run's work folders are its own, locked while a stage uses them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.executor import Executor, Output, StageCall, work_root_for
from pipeline.reporting import ConsoleReporter
from pipeline.stages.common import stage
from pipeline.store import LeaseHeldError, open_store


@stage("loo", version=1)
def write_text(text: str, *, out_dir: Path, work_dir: Path, reporter=None) -> None:
    (Path(out_dir) / "value.txt").write_text(text)


@stage("mmr", version=1)
def copy_input(*, parent: Path, out_dir: Path, work_dir: Path, reporter=None) -> None:
    (Path(out_dir) / "value.txt").write_text((Path(parent) / "value.txt").read_text())


class Quiet(ConsoleReporter):
    def progress(self, message: str) -> None:
        pass


def test_a_stage_computes_from_the_input_version_its_key_was_computed_from(tmp_path):
    """The review's probe: another run re-committed an input between the key and the fetch, and the stage
    computed from the new version while its key and lineage named the old one."""
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    executor = Executor(store, work_root_for(tmp_path / "cache", store, "r"), Quiet())
    first: Output = executor(StageCall("a", write_text, {"text": "v1"}, {}))
    other = open_store(tmp_path / "store", cache_dir=tmp_path / "other")  # another run, same store
    other.put_checkpoint(_folder(tmp_path / "v2", "v2-from-another-run"), "a", config_digest="k2")
    second = executor(StageCall("b", copy_input, {}, {"parent": first}))
    folder = store.get_checkpoint("b", digest=second.manifest_digest)
    assert (folder / "value.txt").read_text() == "v1"
    assert store.manifest("b")["parent"]["manifest_digest"] == first.manifest_digest


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "value.txt").write_text(text)
    return path


def test_runs_of_one_run_name_on_two_stores_have_their_own_work_folders(tmp_path):
    one = open_store(tmp_path / "a" / "demo", cache_dir=tmp_path / "cache" / "store")
    two = open_store(tmp_path / "b" / "demo", cache_dir=tmp_path / "cache" / "store")
    assert work_root_for(tmp_path / "cache", one, "demo") != work_root_for(tmp_path / "cache", two, "demo")
    assert work_root_for(tmp_path / "cache", one, "demo") == work_root_for(tmp_path / "cache", one, "demo")


def test_a_work_folder_in_use_is_refused_naming_its_holder(tmp_path):
    """Two executors on one work folder (a stalled run whose lease was taken over, two processes of a
    run): the second is refused while the first's stage runs, and nothing of the first's is deleted."""
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    work = work_root_for(tmp_path / "cache", store, "r")
    inside, release = threading.Event(), threading.Event()

    @stage("loo", version=1)
    def slow(*, out_dir: Path, work_dir: Path, reporter=None) -> None:
        (Path(work_dir) / "state.bin").write_text("saved")
        inside.set()
        release.wait(30)
        (Path(out_dir) / "value.txt").write_text("done")

    first = Executor(store, work, Quiet())
    thread = threading.Thread(target=lambda: first(StageCall("a", slow, {}, {})))
    thread.start()
    try:
        assert inside.wait(30)
        second = Executor(open_store(tmp_path / "store", cache_dir=tmp_path / "c2"), work, Quiet())
        with pytest.raises(LeaseHeldError, match=r"the work folder .*/a is in use by another run \(.* pid \d+"):
            second.execute(StageCall("a", slow, {}, {}), "some-key")
        assert (work / "a" / "state.bin").read_text() == "saved" and (work / "a.output").is_dir()
    finally:
        release.set()
        thread.join(30)
    assert store.has_checkpoint("a")
