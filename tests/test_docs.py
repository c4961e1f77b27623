"""The docs are prose and summaries: every relative link of README.md and docs/ resolves, and docs/
holds no raw run files (the benchmark and sweep scripts write those to their work directories)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
DOCS_SUFFIXES = {".md", ".json", ".png"}  # pages, summary JSON, embedded plots


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` (anchors aside) whose file does not exist."""
    targets = [t.partition("#")[0] for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]
    return [t for t in targets if t and not (page.parent / t).exists()]


def test_broken_links_finds_a_missing_file(tmp_path):
    (tmp_path / "there.md").write_text("")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](gone.md#x) ![c](img/gone.png) [d](https://example.org/x) [e](#local)")
    assert broken_links(page) == ["gone.md", "img/gone.png"]


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = {str(page.relative_to(ROOT)): links for page in pages if (links := broken_links(page))}
    assert not broken, f"links to missing files: {broken}"


def test_docs_hold_only_pages_summaries_and_plots():
    raw = [
        str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*") if p.is_file() and p.suffix not in DOCS_SUFFIXES
    ]
    assert not raw, f"docs/ keeps pages, summary JSON and embedded plots only; move these out: {raw}"
