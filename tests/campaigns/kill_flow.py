"""Kill campaign: the tiny conversion flow SIGKILLed again and again, restarted each time, then compared
with uninterrupted runs of the same seed.

Setup: a real moto S3 server on loopback holds the store (s3://kills/runs), MLflow writes to a SQLite file.
1. Two uninterrupted runs from scratch (`python -m flows.convert experiment=tiny ...`), each snapshotted
   (every committed checkpoint's files and sha256, and summary.json) and then wiped. Files that differ
   between these two are not deterministic by nature (wall-clock times, throughput) and are left out of
   the comparison; the report names them.
2. Cycles from scratch until at least --kills kills: the flow is started, killed, restarted, ... until it
   finishes. Each start is one of
     time    SIGKILL from outside after a random delay, up to an uninterrupted run's duration (anywhere:
             start-up, training, evaluation, uploads)
     save    SIGKILL from inside the n-th training-state save: after its weights file is written, after the
             new state is renamed into place (before LATEST names it), or after the commit (before the
             old state is removed)
     upload  SIGKILL from inside the n-th S3 upload of a checkpoint file, just before or just after it
   Before each start the committed manifests are recorded. A stage whose output was committed and which
   computes again ("[name] stage ..." in the output, or its manifest changes) counts as recomputed.
3. After each cycle, the final snapshot is compared with the uninterrupted one.

Run: nice python tests/campaigns/kill_flow.py [--kills 20] [--seed 0] [--out tests/campaigns/results]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import run_facts, write_files  # tests/campaigns/report.py, beside this script

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
EXECUTE_LINE = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9._-]*)\] (teacher|loo|convert|mmr|step|sft|evaluate) \.\.\.")
RUN_NAME, BUCKET = "kills", "kills"
SAVE_POINTS = {
    "weights": "weights written, optimizer/trainer state not yet",
    "renamed": "new state renamed into place, LATEST not yet switched",
    "committed": "LATEST switched, old state not yet removed",
}


# ----------------------------------------------------------------------------------------------------
# the child: the flow's command line, with a SIGKILL planted inside a save or an upload


def child(mode: str, count: int, point: str, overrides: list[str]) -> int:
    calls = collections.Counter()

    def die(what: str) -> None:
        print(f"[campaign] SIGKILL inside {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "save":
        import pipeline.train.state as state

        real_save, real_commit = state.save_model, state._commit

        def save_model(*args, **kwargs):
            real_save(*args, **kwargs)
            calls["save"] += 1
            if calls["save"] == count and point == "weights":
                die(f"training-state save {count} ({SAVE_POINTS[point]})")

        def commit(*args, **kwargs):
            if calls["save"] == count and point == "renamed":
                die(f"training-state save {count} ({SAVE_POINTS[point]})")
            real_commit(*args, **kwargs)
            if calls["save"] == count and point == "committed":
                die(f"training-state save {count} ({SAVE_POINTS[point]})")

        state.save_model, state._commit = save_model, commit
    elif mode == "upload":
        from pipeline.store.s3 import S3Store

        real_upload = S3Store._upload_file

        def upload(self, source, key):
            calls["upload"] += 1
            if calls["upload"] == count and point == "before":
                die(f"upload {count} ({key}), before it")
            real_upload(self, source, key)
            if calls["upload"] == count:
                die(f"upload {count} ({key}), after it")

        S3Store._upload_file = upload
    from flows.convert import main

    return main(overrides)


# ----------------------------------------------------------------------------------------------------
# the campaign


def flow_env(work: Path, endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update({
        "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": endpoint,
    })
    return env


def start_flow(work: Path, env: dict[str, str], overrides: list[str], mode: str, count: int, point: str,
               log_path: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", mode, str(count), point, "--", *overrides]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL the flow and whatever it started (the ephemeral Prefect server)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def committed(client, prefix: str) -> dict[str, str]:
    """name -> sha256 of its manifest, for every committed checkpoint under the run's prefix."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    found = {}
    for page in pages:
        for item in page.get("Contents", []):
            rest = item["Key"][len(prefix):]
            if rest.count("/") == 1 and rest.endswith("/manifest.json"):
                body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                found[rest.split("/")[0]] = hashlib.sha256(body).hexdigest()
    return found


def snapshot(endpoint: str, cache: Path) -> dict[str, dict[str, str]]:
    """name -> {file: sha256} of every committed checkpoint, downloaded and verified through the store."""
    from pipeline.store import open_store

    store = open_store(f"s3://{BUCKET}/runs/{RUN_NAME}", endpoint_url=endpoint, cache_dir=cache)
    names = committed(store.client, f"runs/{RUN_NAME}/")
    result = {}
    for name in sorted(names):
        folder = store.get_checkpoint(name)
        result[name] = {entry["path"]: entry["sha256"] for entry in store.manifest(name)["files"]}
        if name == "evaluate":
            result["summary.json"] = {"content": (folder / "summary.json").read_text()}
    return result


def wipe(client, work: Path) -> None:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/")
    keys = [{"Key": item["Key"]} for page in pages for item in page.get("Contents", [])]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start:start + 1000]})
    shutil.rmtree(work / "cache", ignore_errors=True)


def summary_without(summary_text: str, keys: set[str]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in keys} for record in json.loads(summary_text)]


def differences(first: dict, second: dict) -> set[str]:
    """'name/file' of every file whose sha256 differs (or exists in one only)."""
    found = set()
    for name in set(first) | set(second):
        if name == "summary.json":
            continue
        files_a, files_b = first.get(name, {}), second.get(name, {})
        found |= {f"{name}/{path}" for path in set(files_a) | set(files_b) if files_a.get(path) != files_b.get(path)}
    return found


def report_notes(cycles: int) -> list[str]:
    return [
        "Compared per cycle: every file of every committed checkpoint (sha256 from the store's verified download),",
        "and summary.json's records. Left out (`left_out_as_not_deterministic`): what two uninterrupted runs of",
        "the same seed already differ in: `stage.json` (wall-clock times), `evaluate/summary.json` as bytes and",
        "the frontier plots (throughput; summary.json's other fields are compared). Model weights",
        "(`model.safetensors`), configs, tokenizers, `loo.json`, `mmr.json` and run configs are compared byte",
        f"for byte. `files_compared_per_cycle_total` is the sum over the {cycles} cycles.",
        "Kills: `save` = SIGKILL from inside the n-th training-state save (" + "; ".join(SAVE_POINTS.values()) + "),",
        "`upload` = from inside the n-th S3 upload of a checkpoint file (before or after it), `time` = from",
        "outside at a random moment up to an uninterrupted run's duration.",
    ]


def events_table(events: list[dict]) -> list[str]:
    table = ["| cycle | start | mode | killed | where | stages computed |", "| --- | --- | --- | --- | --- | --- |"]
    return table + [f"| {e['cycle']} | {e['start']} | {e['mode']} | {e['killed']} | {e['where'] or ''} | "
                     f"{', '.join(e['stages_computed'])} |" for e in events]


def write_report(args, counts, durations, recomputed, nondeterministic, summary_varying, mismatches, events,
                 started, facts, final: bool) -> None:
    """kill-campaign.{json,md}; written after every start too, so a stopped campaign still shows its figures."""
    report = {
        **facts,
        "kills": counts["kills"],
        "kills_by_mode": {key[6:]: value for key, value in sorted(counts.items()) if key.startswith("kills.")},
        "cycles_completed": counts["cycles"],
        "reference_run_seconds": [round(value, 1) for value in durations],
        "completed_stages_recomputed": len(recomputed),
        "recomputed": recomputed,
        "files_compared_per_cycle_total": counts["files compared"],
        "left_out_as_not_deterministic": {"files": sorted(nondeterministic), "summary_keys": sorted(summary_varying)},
        "results_identical": not mismatches,
        "mismatches": mismatches,
        "seconds": round(time.monotonic() - started, 1),
        "finished": final,
        "events": events,
    }
    lines = write_files(args.out, "kill-campaign", "Kill campaign", report, hidden=("events",),
                        notes=report_notes(counts["cycles"]), tail=events_table(events))
    if final:
        print("\n".join(lines[:20]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cycles", type=int, default=10)
    parser.add_argument("--out", type=Path, default=TESTS / "campaigns" / "results")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "COUNT", "POINT"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        return child(args.child[0], int(args.child[1]), args.child[2], args.overrides)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks when stopped
    sys.path[:0] = [str(TESTS), str(REPO)]

    from fixtures_servers import AWS_HIDDEN_ENV, AWS_TEST_ENV, start_moto_server

    facts = run_facts("nice python")

    for name in AWS_HIDDEN_ENV:
        os.environ.pop(name, None)
    os.environ.update(AWS_TEST_ENV)
    rng = random.Random(args.seed)
    started = time.monotonic()
    events: list[dict] = []
    counts: collections.Counter[str] = collections.Counter()
    recomputed: list[str] = []
    mismatches: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kill-campaign-") as temporary:
        work = Path(temporary)
        moto = start_moto_server(work / "moto.log")
        try:
            client = moto.client()
            client.create_bucket(Bucket=BUCKET)
            env = flow_env(work, moto.endpoint_url)
            overrides = [
                "experiment=tiny", f"run_name={RUN_NAME}", f"storage.uri=s3://{BUCKET}/runs",
                f"storage.endpoint_url={moto.endpoint_url}", f"storage.cache_dir={work / 'cache'}",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=kills",
            ]

            # 1. two uninterrupted runs: the reference, and what is not deterministic by nature
            references, durations = [], []
            for index in range(2):
                wipe(client, work)
                began = time.monotonic()
                process = start_flow(work, env, overrides, "none", 0, "", work / f"reference-{index}.log")
                code = process.wait(timeout=1800)
                stop_group(process)
                if code != 0:
                    print((work / f"reference-{index}.log").read_text()[-4000:])
                    raise SystemExit(f"the uninterrupted run {index} failed with exit code {code}")
                durations.append(time.monotonic() - began)
                references.append(snapshot(moto.endpoint_url, work / f"snapshot-ref-{index}"))
                print(f"reference run {index}: {durations[-1]:.0f}s, {len(references[-1]) - 1} checkpoints", flush=True)
            reference = references[0]
            nondeterministic = differences(references[0], references[1])
            summary_a = json.loads(references[0]["summary.json"]["content"])
            summary_b = json.loads(references[1]["summary.json"]["content"])
            summary_varying = {key for a, b in zip(summary_a, summary_b) for key in a if a.get(key) != b.get(key)}
            print(f"not deterministic by nature: files {sorted(nondeterministic)}, summary keys {sorted(summary_varying)}")

            # 2. cycles of kill and restart
            cycle = 0
            while counts["kills"] < args.kills and cycle < args.max_cycles:
                cycle += 1
                wipe(client, work)
                for attempt in range(1, 200):
                    before = committed(client, f"runs/{RUN_NAME}/")
                    mode = "none" if counts["kills"] >= args.kills else rng.choice(["time", "save", "upload"])
                    count = {"save": rng.randint(1, 6), "upload": rng.randint(1, 12)}.get(mode, 0)
                    point = {"save": rng.choice(sorted(SAVE_POINTS)), "upload": rng.choice(["before", "after"])}.get(mode, "")
                    log_path = work / f"cycle{cycle}-start{attempt}.log"
                    process = start_flow(work, env, overrides, mode, count, point, log_path)
                    delay = rng.uniform(2.0, durations[0]) if mode == "time" else None
                    try:
                        code = process.wait(timeout=delay if delay is not None else 1800)
                    except subprocess.TimeoutExpired:
                        code = None
                    killed_from_outside = code is None
                    stop_group(process)
                    output = log_path.read_text(errors="replace")
                    executed = EXECUTE_LINE.findall(output)
                    after = committed(client, f"runs/{RUN_NAME}/")
                    for name, _stage in executed:
                        if name in before:
                            recomputed.append(f"cycle {cycle} start {attempt}: {name} computed again")
                    for name, digest in before.items():
                        if after.get(name) != digest:
                            recomputed.append(f"cycle {cycle} start {attempt}: {name} manifest changed")
                    inside = re.search(r"\[campaign\] SIGKILL inside (.*)", output)
                    killed = killed_from_outside or inside is not None or code == -signal.SIGKILL
                    running = executed[-1][0] if executed else "(start-up)"
                    event = {"cycle": cycle, "start": attempt, "mode": mode, "killed": killed,
                             "where": inside.group(1) if inside else (f"at {delay:.1f}s, in {running}"
                                                                         if killed_from_outside else None),
                             "exit_code": code, "stages_committed_before": len(before),
                             "stages_computed": [name for name, _ in executed]}
                    events.append(event)
                    print(json.dumps(event), flush=True)
                    write_report(args, counts, durations, recomputed, nondeterministic, summary_varying, mismatches,
                                 events, started, facts, final=False)
                    if killed:
                        counts["kills"] += 1
                        counts[f"kills.{mode}"] += 1
                        continue
                    if code != 0:
                        print(output[-4000:])
                        raise SystemExit(f"cycle {cycle} start {attempt} failed with exit code {code}")
                    break  # finished
                final = snapshot(moto.endpoint_url, work / f"snapshot-cycle-{cycle}")
                differing = differences(reference, final) - nondeterministic
                summary_final = json.loads(final["summary.json"]["content"])
                same_summary = ([{k: v for k, v in r.items() if k not in summary_varying} for r in summary_final]
                                == [{k: v for k, v in r.items() if k not in summary_varying} for r in summary_a])
                counts["cycles"] += 1
                counts["files compared"] += sum(len(files) for name, files in final.items() if name != "summary.json") \
                    - len(nondeterministic)
                if differing or not same_summary:
                    mismatches.append(f"cycle {cycle}: files {sorted(differing)}, summary equal: {same_summary}")
        finally:
            moto.server.stop()

    write_report(args, counts, durations, recomputed, nondeterministic, summary_varying, mismatches, events,
                 started, facts, final=True)
    return 0 if not mismatches and not recomputed else 1


if __name__ == "__main__":
    sys.exit(main())
