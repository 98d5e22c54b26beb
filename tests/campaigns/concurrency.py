"""Concurrency campaign: runs that share a run name, a store or a checkpoint, at the same time, through the
command line (`python -m flows.convert experiment=tiny`), then every store read back and compared.

Setup: one cache folder (`storage.cache_dir`) for every run, as on a machine where several people or jobs
run conversions; each process its own Prefect home and MLflow SQLite file (what is measured is the store
and the work folders). One uninterrupted run is the reference. Then, for --rounds rounds:
  A  two runs of the same run_name on two different folder stores, at once (they shared
     `<cache>/work/<run_name>`: each deleted the other's output folders or resumed its training state);
  B  two runs of the same run_name on the same store, at once (the second waits for no lease: it stops with
     one line naming the holder, and is started again until it finishes);
  C  a run during which another process commits a new version of its `teacher` (other weights, the same
     cache key): every later stage must compute from the version its key names;
  D  readers holding a checkpoint while a writer re-puts it again and again with pruning at once
     (`retain_seconds=0`), on a folder store and in S3 (moto): a reader's files never change or vanish;
  E  a run whose storage.uri / run_name put a checkpoint where a user's folder is: refused, nothing moved.
Files planted beside the stores and in a user's folder are checked at the end: none may be deleted.

Counted: checkpoints lost (a name a finished run committed that is missing or does not verify), wrong inputs
served (a stage's output different from the reference, or whose recorded parent is not the version its key
was computed from; a reader that saw other bytes than its manifest), files deleted outside the store.

Run: nice python tests/campaigns/concurrency.py [--rounds 2] [--out tests/campaigns/results]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import run_facts, write_files  # tests/campaigns/report.py, beside this script

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
RUN_NAME = "tiny"  # the preset's own run name: every run below uses it
HELD_LINE = re.compile(r"is being written by another run \(.*\); wait for it to finish or stop it")
# files two uninterrupted runs of the same seed already differ in (wall-clock times, throughput)
NOT_DETERMINISTIC = re.compile(r"(^|/)(stage\.json|summary\.json|frontier[^/]*\.png)$")


def flow_env(work: Path, home: str) -> dict[str, str]:
    (work / "prefect" / home).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "prefect" / home), "HF_HUB_OFFLINE": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "PYTHONUNBUFFERED": "1"})
    return env


def start_run(work: Path, name: str, store_uri: str, *more: str) -> tuple[subprocess.Popen, Path]:
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "flows.convert", "experiment=tiny", f"storage.uri={store_uri}",
               f"storage.cache_dir={work / 'cache'}", f"tracking.uri=sqlite:///{work / 'mlflow' / name}.db",
               "tracking.experiment=concurrency", *more]
    (work / "mlflow").mkdir(exist_ok=True)
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=work, env=flow_env(work, name), stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def finish(process: subprocess.Popen, timeout: float = 3600) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the ephemeral Prefect server it started
        except ProcessLookupError:
            pass


def snapshot(root: Path, cache: Path) -> dict[str, dict]:
    """name -> {"files": {path: sha256}, "manifest": ...} of every committed checkpoint of a folder store,
    each verified (sizes and sha256) through a fresh cache."""
    from pipeline.store import open_store

    store = open_store(root / RUN_NAME, cache_dir=cache)
    found = {}
    for link in sorted((root / RUN_NAME).iterdir()) if (root / RUN_NAME).is_dir() else []:
        if link.name.startswith(".") or not store.has_checkpoint(link.name):
            continue
        store.get_checkpoint(link.name)  # raises if a file is missing or its hash is wrong
        manifest = store.manifest(link.name)
        found[link.name] = {"files": {entry["path"]: entry["sha256"] for entry in manifest["files"]},
                            "manifest": manifest}
    return found


def compare(reference: dict, got: dict, where: str, counts: collections.Counter, problems: list[str]) -> None:
    for name, expected in reference.items():
        if name not in got:
            counts["checkpoints_lost"] += 1
            problems.append(f"{where}: {name} missing")
            continue
        for path, digest in expected["files"].items():
            if NOT_DETERMINISTIC.search(f"{name}/{path}"):
                continue
            counts["files_compared"] += 1
            if got[name]["files"].get(path) != digest:
                counts["wrong_inputs_served"] += 1
                problems.append(f"{where}: {name}/{path} differs from the reference")


def plant_sentinels(work: Path) -> dict[Path, bytes]:
    """Files of 'users' beside the stores, and in a folder a run will be pointed at."""
    files = {work / "stores" / "notes.txt": b"a user's notes beside the stores",
             work / "stores" / "teacher" / "precious.txt": b"a folder named like a checkpoint",
             work / "home" / "Documents" / "teacher" / "thesis.tex": b"a user's thesis",
             work / "home" / "Documents" / "H-2" / "data.bin": os.urandom(1000),
             work / "cache" / "mine.txt": b"a user's file in the cache folder"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


# ----------------------------------------------------------------------------------------------------
# scenarios


def two_stores_one_run_name(work: Path, round_index: int, reference: dict, counts, problems, events) -> None:
    roots = [work / "stores" / f"A{round_index}-{side}" for side in ("left", "right")]
    started = [start_run(work, f"A{round_index}-{i}", str(root)) for i, root in enumerate(roots)]
    codes = [finish(process) for process, _ in started]
    events.append({"scenario": "A", "round": round_index, "exit_codes": codes})
    for (process, log), code, root in zip(started, codes, roots):
        if code != 0:
            counts["runs_failed"] += 1
            problems.append(f"A{round_index}: run on {root.name} exited {code}: {log.read_text()[-600:]}")
        where = f"A{round_index}-{root.name}"
        compare(reference, snapshot(root, work / "verify" / where), where, counts, problems)


def one_store_two_runs(work: Path, round_index: int, reference: dict, counts, problems, events) -> None:
    root = work / "stores" / f"B{round_index}"
    started = [start_run(work, f"B{round_index}-{i}", str(root)) for i in range(2)]
    codes = [finish(process) for process, _ in started]
    attempts = [1, 1]
    for index, ((process, log), code) in enumerate(zip(started, codes)):
        while code != 0 and attempts[index] < 4:
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                counts["tracebacks"] += 1
                problems.append(f"B{round_index}-{index}: a traceback: {text[-800:]}")
            if HELD_LINE.search(text):
                counts["refused_with_the_holder_named"] += 1
            attempts[index] += 1
            process, log = start_run(work, f"B{round_index}-{index}-again{attempts[index]}", str(root))
            code = finish(process)
            if code == 0:
                recomputed = re.findall(r"\[([A-Za-z0-9.-]+)\] (?:teacher|loo|convert|mmr|step|sft|evaluate) \.\.\.",
                                        log.read_text(errors="replace"))
                counts["stages_computed_by_the_restarts"] += len(recomputed)
        if code != 0:
            counts["runs_failed"] += 1
            problems.append(f"B{round_index}-{index}: did not finish in {attempts[index]} starts")
    events.append({"scenario": "B", "round": round_index, "exit_codes": codes, "starts": attempts})
    compare(reference, snapshot(root, work / "verify" / f"B{round_index}"), f"B{round_index}", counts, problems)


def input_re_put_mid_run(work: Path, round_index: int, reference: dict, counts, problems, events) -> None:
    """While the run is past its teacher, another process commits other teacher weights under the same key."""
    from pipeline.store import open_store

    root = work / "stores" / f"C{round_index}"
    process, log = start_run(work, f"C{round_index}", str(root))
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and process.poll() is None:
        if (root / RUN_NAME / "loo" / "manifest.json").is_file():
            break
        time.sleep(0.2)
    replaced, keyed_on = False, None
    if process.poll() is None:
        store = open_store(root / RUN_NAME, cache_dir=work / "cache" / "re-putter")
        original = json.loads((root / RUN_NAME / "teacher" / "manifest.json").read_text())
        from pipeline.store import manifest_digest

        keyed_on = manifest_digest(original)  # the version every later stage's key was computed from
        other = work / "other-teacher" / f"C{round_index}"
        shutil.copytree(store.get_checkpoint("teacher"), other, ignore=shutil.ignore_patterns("manifest.json"))
        from safetensors.torch import load_file, save_file

        tensors = load_file(other / "model.safetensors")
        save_file({key: value + 0.01 for key, value in tensors.items()}, other / "model.safetensors",
                  metadata={"format": "pt"})
        store.lease_wait_seconds = 600
        store.put_checkpoint(other, "teacher", config_digest=original["config_digest"],
                             metadata=original.get("metadata") or {})
        replaced = True
    code = finish(process)
    events.append({"scenario": "C", "round": round_index, "exit_code": code, "teacher_replaced_mid_run": replaced})
    if code != 0:
        counts["runs_failed"] += 1
        problems.append(f"C{round_index}: exited {code}: {log.read_text()[-600:]}")
        return
    got = snapshot(root, work / "verify" / f"C{round_index}")
    got_reference_teacher = {name: entry for name, entry in got.items() if name != "teacher"}
    compare({name: entry for name, entry in reference.items() if name != "teacher"}, got_reference_teacher,
            f"C{round_index}", counts, problems)
    if replaced:
        counts["inputs_replaced_mid_run"] += 1
        assert got["teacher"]["manifest"]["files"] != reference["teacher"]["manifest"]["files"]  # replaced
        for name, entry in got.items():  # every stage whose recorded parent is the teacher: the keyed version
            parent = entry["manifest"].get("parent") or {}
            if parent.get("name") == "teacher":
                counts["lineage_checked"] += 1
                if parent.get("manifest_digest") != keyed_on:
                    counts["wrong_inputs_served"] += 1
                    problems.append(f"C{round_index}: {name} records a teacher version it was not keyed on")


def readers_during_re_puts(work: Path, moto_endpoint: str | None, counts, problems, events) -> None:
    from pipeline.store import open_store

    stores = {"file": (str(work / "stores" / "D"), None)}
    if moto_endpoint:
        stores["s3"] = ("s3://concurrency/D", moto_endpoint)
    for kind, (uri, endpoint) in stores.items():
        writer = open_store(uri, endpoint_url=endpoint, cache_dir=work / "cache" / f"D-writer-{kind}")
        writer.retain_seconds = 0  # a replaced version is pruned by the next put, unless a reader holds it
        source = work / "D-source" / kind
        source.mkdir(parents=True)
        (source / "weights.bin").write_bytes(os.urandom(2_000_000))
        (source / "config.json").write_text("{}")
        writer.put_checkpoint(source, "X", config_digest="0")
        stop = threading.Event()
        reads = collections.Counter()

        def read_loop(index: int) -> None:
            reader = open_store(uri, endpoint_url=endpoint, cache_dir=work / "cache" / f"D-reader-{kind}-{index}")
            while not stop.is_set():
                try:
                    with reader.hold("X") as folder:
                        manifest = json.loads((folder / "manifest.json").read_text())
                        for _ in range(3):  # read slowly, as a stage reads its input over time
                            for entry in manifest["files"]:
                                digest = hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest()
                                if digest != entry["sha256"]:
                                    reads["wrong"] += 1
                            time.sleep(0.05)
                    reads["ok"] += 1
                except FileNotFoundError as error:
                    reads["vanished"] += 1
                    problems.append(f"D-{kind}: a held file vanished: {error}")
                except Exception as error:  # a re-put switching under the reader is retried by the store
                    reads["errors"] += 1
                    problems.append(f"D-{kind}: reader error {type(error).__name__}: {error}")

        threads = [threading.Thread(target=read_loop, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for put in range(1, 16):
            (source / "weights.bin").write_bytes(os.urandom(2_000_000))
            writer.put_checkpoint(source, "X", config_digest=str(put))
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(60)
        counts["reader_holds"] += reads["ok"]
        counts["wrong_inputs_served"] += reads["wrong"] + reads["vanished"]
        counts["reader_errors"] += reads["errors"]
        events.append({"scenario": "D", "store": kind, "re_puts": 15, **dict(reads)})


def a_users_folder_in_the_way(work: Path, counts, problems, events) -> None:
    process, log = start_run(work, "E", str(work / "home"), "run_name=Documents")
    code = finish(process)
    text = log.read_text(errors="replace")
    refused = code == 1 and "never moves or deletes what it did not write" in text and "Traceback" not in text
    events.append({"scenario": "E", "exit_code": code, "refused_in_one_line": refused})
    if not refused:
        problems.append(f"E: expected a one-line refusal, got exit {code}: {text[-600:]}")
    counts["user_folders_refused"] += int(refused)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TESTS / "campaigns" / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path[:0] = [str(TESTS), str(REPO)]
    from fixtures_servers import AWS_HIDDEN_ENV, AWS_TEST_ENV, start_moto_server

    facts = run_facts("nice python")
    for name in AWS_HIDDEN_ENV:
        os.environ.pop(name, None)
    os.environ.update(AWS_TEST_ENV)
    started = time.monotonic()
    counts: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    events: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="concurrency-") as temporary:
        work = Path(temporary)
        sentinels = plant_sentinels(work)
        moto = start_moto_server(work / "moto.log")
        try:
            moto.client().create_bucket(Bucket="concurrency")
            process, log = start_run(work, "reference", str(work / "stores" / "reference"))
            began = time.monotonic()
            if finish(process) != 0:
                print(log.read_text()[-4000:])
                raise SystemExit("the reference run failed")
            reference_seconds = time.monotonic() - began
            reference = snapshot(work / "stores" / "reference", work / "verify" / "reference")
            print(f"reference: {reference_seconds:.0f}s, {len(reference)} checkpoints", flush=True)
            for round_index in range(1, args.rounds + 1):
                for scenario in (two_stores_one_run_name, one_store_two_runs, input_re_put_mid_run):
                    scenario(work, round_index, reference, counts, problems, events)
                    print(json.dumps(events[-1]), flush=True)
            readers_during_re_puts(work, moto.endpoint_url, counts, problems, events)
            a_users_folder_in_the_way(work, counts, problems, events)
        finally:
            moto.server.stop()
        deleted = [str(path.relative_to(work)) for path, data in sentinels.items()
                   if not path.is_file() or path.read_bytes() != data]
    report = {
        **facts,
        "rounds": args.rounds,
        "reference_run_seconds": round(reference_seconds, 1),
        "checkpoints_in_a_run": len(reference),
        "checkpoints_lost": counts["checkpoints_lost"],
        "wrong_inputs_served": counts["wrong_inputs_served"],
        "files_deleted_outside_the_store": len(deleted),
        "runs_failed": counts["runs_failed"],
        "tracebacks": counts["tracebacks"],
        "files_compared": counts["files_compared"],
        "second_runs_refused_with_the_holder_named": counts["refused_with_the_holder_named"],
        "stages_computed_by_the_restarts": counts["stages_computed_by_the_restarts"],
        "inputs_replaced_mid_run": counts["inputs_replaced_mid_run"],
        "lineage_records_checked": counts["lineage_checked"],
        "reader_holds_during_re_puts": counts["reader_holds"],
        "reader_errors": counts["reader_errors"],
        "user_folders_refused": counts["user_folders_refused"],
        "problems": problems[:50],
        "deleted": deleted,
        "seconds": round(time.monotonic() - started, 1),
        "events": events,
    }
    notes = ["A: two runs of one run_name on two folder stores at once, one cache folder. B: two runs on one store",
             "at once; the one refused (the other holds a stage's lease) is started again until it finishes. C: a",
             "run during which another process commits other teacher weights under the same key; the later",
             "stages must equal the reference and record the teacher version they were keyed on. D: two readers",
             "holding a checkpoint (re-hashing its files) while a writer re-puts it 15 times with",
             "retain_seconds=0, on a folder store and in S3. E: storage.uri / run_name pointing at a user's folder",
             "that has folders named like checkpoints. Compared with the reference: every file of every",
             "checkpoint but stage.json, summary.json and the frontier plots (wall-clock times, throughput).",
             "Sentinel files beside the stores, in the user's folder and in the cache are checked at the end."]
    lines = write_files(args.out, "concurrency", "Concurrency campaign", report, hidden=("events", "problems"),
                        notes=notes, tail=["", "Events:", "", *[f"- `{json.dumps(event)}`" for event in events],
                                           *(["", "Problems:", ""] + [f"- {p}" for p in problems[:50]]
                                             if problems else [])])
    print("\n".join(lines[:30]))
    failed = counts["checkpoints_lost"] or counts["wrong_inputs_served"] or deleted or counts["runs_failed"] \
        or counts["tracebacks"] or problems
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
