"""The report every campaign writes: `<stem>.json` with all its figures and `<stem>.md`, a table of them.

Both name the command, the date, the machine and the commit the campaign ran on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_RESULTS = "tests/campaigns/results"
_HEADER = ("command", "date", "machine", "commit", "seconds")


def run_facts(prefix: str) -> dict[str, str]:
    """command (`prefix` + this script's arguments), date, machine and commit, for the top of a report."""
    return {
        "command": " ".join([prefix, *(shlex.quote(arg) for arg in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})",
        "commit": _commit(),
    }


def _commit() -> str:
    """HEAD, marked when the code differs from it (reports being written are not counted)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--", ".", f":(exclude){_RESULTS}").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes)" if changed else head


def write_files(out: Path, stem: str, title: str, report: dict, *, hidden: tuple[str, ...] = (),
                 notes: list[str] = (), tail: list[str] = ()) -> list[str]:
    """Write `out/<stem>.json` (all of `report`) and `out/<stem>.md`: the header, a table of every measure
    except `hidden`, then `notes` and `tail` (each a list of Markdown lines). Returns the Markdown lines."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {title}", "", f"`{report['command']}`", "",
             f"{report['date']} on {report['machine']}, commit {report['commit']}, {report['seconds']} s", "",
             "| measure | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in report.items() if key not in _HEADER + tuple(hidden)]
    for block in (notes, tail):
        if block:
            lines += ["", *block]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines
