"""README.md and docs/*.md: every relative link resolves (file and anchor), every `make <target>` exists in
the Makefile and every `experiment=<name>` in conf/experiment/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
# a command: at the start of an inline code span or of a line in a code block, or after `&&`, `;`, `$(`
MAKE = re.compile(r"(?:^|&&|;|\$\()\s*make\s+(?:-\S+\s+)*([a-z][a-z0-9_-]*)", re.M)
EXPERIMENT = re.compile(r"\bexperiment=([A-Za-z0-9_]+)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (duplicates numbered -1, -2, ...)."""
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def code_spans(text: str) -> list[str]:
    """Fenced blocks and inline code: where commands are written."""
    blocks = FENCE.findall(text)
    return blocks + [span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text))]


def make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.$() -]+?)\s*:(?!=)", line)
        if match and not line.startswith(("\t", "#")):
            targets.update(match.group(1).split())
    return targets


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    text = FENCE.sub("", page.read_text())
    text = INLINE_CODE.sub("", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_make_targets_and_experiments_exist(page: Path):
    spans = code_spans(page.read_text())
    targets = make_targets()
    unknown_targets = sorted({name for span in spans for name in MAKE.findall(span)} - targets)
    assert not unknown_targets, f"{page.relative_to(ROOT)} names make targets the Makefile lacks: {unknown_targets}"
    experiments = {path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml")}
    named = {name for span in spans for name in EXPERIMENT.findall(span)}
    unknown = sorted(named - experiments - {"null"})
    assert not unknown, f"{page.relative_to(ROOT)} names experiments conf/experiment/ lacks: {unknown}"


def test_the_makefile_parser_sees_the_known_targets():
    assert {"pipeline", "test", "teacher", "loo", "steps", "eval", "stack-down", "bench-gdn"} <= make_targets()
