"""S3 fault campaign: many puts and gets of checkpoints through the fault-injecting proxy, then a count of
checkpoints lost.

A real moto S3 server runs on loopback behind tests/fault_proxy.py, which fails a share of requests at
random (dropped connections, stalls past the read timeout, 500/503/SlowDown, truncated bodies). Each
round puts a new version of one of a few checkpoint names; some rounds also cut the network off part-way
through the put (an interrupted upload), and some corrupt one object on its next download(s). After
every round a fresh reader (empty cache) downloads every committed checkpoint and compares its bytes
with the last put that returned successfully for that name.

    checkpoint lost = a name whose last successful put is not what a reader gets back (missing, older,
                      newer-but-unfinished or wrong bytes)

Run: python tests/campaigns/s3_faults.py [--rounds 40] [--rate 0.25] [--out tests/campaigns/results]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from fault_proxy import FaultPlan, FaultProxy  # noqa: E402
from fixtures_servers import AWS_HIDDEN_ENV, AWS_TEST_ENV, start_moto_server  # noqa: E402
from report import run_facts, write_files  # noqa: E402  (tests/campaigns/report.py, beside this script)

from pipeline.store import IntegrityError, S3TransferOptions, StoreError, open_store  # noqa: E402

MiB = 1024 * 1024
NAMES = ["teacher", "H-2", "H-3", "H-3-SFT"]


def make_source(root: Path, rng: random.Random, big: bool) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"nonce": rng.getrandbits(64)}))
    (root / "model.safetensors").write_bytes(rng.randbytes(rng.randint(50_000, 400_000)))
    (root / "tokenizer.json").write_bytes(rng.randbytes(3_000))
    if big:
        (root / "train_state.bin").write_bytes(rng.randbytes(6 * MiB))  # multipart
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (stop moto) when stopped
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.25, help="share of requests that get a random fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TESTS / "campaigns" / "results")
    args = parser.parse_args()

    for name in AWS_HIDDEN_ENV:
        os.environ.pop(name, None)
    os.environ.update(AWS_TEST_ENV)
    facts = run_facts("python")
    rng = random.Random(args.seed)
    options = S3TransferOptions(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2, max_attempts=4,
        transfer_attempts=6, backoff_seconds=0.05, connect_timeout=1.0, read_timeout=1.0,
    )
    counts: collections.Counter[str] = collections.Counter()
    lost: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="s3-faults-") as temporary:
        work = Path(temporary)
        moto = start_moto_server(work / "moto.log")
        try:
            bucket = moto.create_bucket("faults")
            with FaultProxy(moto.endpoint_url, FaultPlan(rate=args.rate, seed=args.seed)) as proxy:
                store = open_store(f"s3://{bucket}/run", endpoint_url=proxy.endpoint_url, cache_dir=work / "cache",
                                   transfer=options)
                expected: dict[str, dict[str, bytes]] = {}
                for round_index in range(args.rounds):
                    name = rng.choice(NAMES)
                    source = make_source(work / f"src-{round_index}", rng, big=rng.random() < 0.15)
                    interrupt = rng.random() < 0.3
                    if interrupt:  # the network goes away part-way through this put
                        proxy.fail_after = proxy.stats["requests"] + rng.randint(1, 12)
                    try:
                        store.put_checkpoint(source, name, config_digest=f"round-{round_index}")
                        expected[name] = tree(source)
                        counts["puts committed"] += 1
                    except StoreError as error:
                        counts["puts failed (reported, nothing committed)"] += 1
                        if not interrupt:
                            print(f"round {round_index}: put failed without an interruption: {error}")
                    finally:
                        proxy.fail_after = None
                    if interrupt:
                        counts["puts interrupted"] += 1
                    if expected and rng.random() < 0.3:  # a stored object turns bad for 1 or 2 downloads
                        victim = rng.choice(sorted(expected))
                        version = store.manifest(victim)["version"]
                        times = rng.choice([1, 2])
                        proxy.corrupt_keys[f"/{bucket}/run/{victim}/{version}/model.safetensors"] = times
                        counts[f"objects corrupted {times}x"] += 1
                    reader = open_store(store.uri, endpoint_url=proxy.endpoint_url,
                                        cache_dir=work / f"reader-{round_index}", transfer=options)
                    for checked, files in expected.items():
                        try:
                            got = tree(reader.get_checkpoint(checked))
                        except IntegrityError as error:  # corrupted on every download: reported, retried later
                            counts["corruption reported"] += 1
                            print(f"round {round_index}: {error}")
                            proxy.corrupt_keys.clear()
                            got = tree(reader.get_checkpoint(checked))
                        counts["checkpoints verified"] += 1
                        if got != files:
                            lost.append(f"round {round_index}: {checked}")
                    proxy.corrupt_keys.clear()
                stats = dict(proxy.stats)
        finally:
            moto.server.stop()
    elapsed = time.monotonic() - started
    report = {
        **facts,
        "rounds": args.rounds,
        "fault_rate": args.rate,
        "seed": args.seed,
        "requests": stats.get("requests", 0),
        "faults_injected": stats.get("faults", 0),
        "faults_by_kind": {key[6:]: value for key, value in sorted(stats.items()) if key.startswith("fault.")},
        **{key: value for key, value in sorted(counts.items())},
        "checkpoints_lost": len(lost),
        "lost": lost,
        "seconds": round(elapsed, 1),
    }
    notes = ["Random faults hit a share of all requests; `drop` also counts the requests refused while the",
             "network was cut during an interrupted put. `corruption reported` = objects still wrong after the",
             "second download (reported in one line, then read correctly once the corruption stopped);",
             "`checkpoints_lost` counts names whose last successful put did not read back byte for byte."]
    lines = write_files(args.out, "s3-faults", "S3 fault campaign", report, hidden=("lost",), notes=notes)
    print("\n".join(lines))
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())
