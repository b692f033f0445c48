"""The repository's docs hold no broken relative link: in README.md and docs/*.md, every
``[text](path)`` and ``[text](path#anchor)`` (and image) points to a file of the repository,
and every ``#anchor`` to a heading of its Markdown target, slugged as GitHub does.

Links are read with markdown-it-py (CommonMark + tables), so links inside code blocks and
code spans are not links; http(s), mailto and other scheme links are not checked."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from tests.conftest import REPO

# A URL scheme (http:, https:, mailto:, data:, ...): not a file of the repository.
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path) -> list[Path]:
    """README.md and every docs/*.md under ``root``, sorted."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _tokens(text: str) -> list[Token]:
    return MarkdownIt("commonmark").enable("table").parse(text)


def github_slug(title: str) -> str:
    """A heading's anchor as GitHub makes it (github-slugger): lowercase; every character
    but letters, digits, marks, ``-``, ``_`` and spaces removed; spaces become ``-``."""
    kept = (
        ch
        for ch in title.lower()
        if ch.isalnum() or ch in "-_ " or unicodedata.category(ch).startswith("M")
    )
    return "".join(kept).replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """The anchors of every heading of a Markdown text; a repeated slug gets ``-1``,
    ``-2``, ... in order, as on GitHub."""
    tokens = _tokens(text)
    seen: dict[str, int] = {}
    anchors = set()
    for opening, inline in pairwise(tokens):
        if opening.type != "heading_open":
            continue
        title = "".join(
            child.content
            for child in inline.children or []
            if child.type in ("text", "code_inline")
        )
        base = anchor = github_slug(title)
        while anchor in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        seen[anchor] = 0
        anchors.add(anchor)
    return anchors


@cache
def _anchors_of(path: Path) -> frozenset[str]:
    return frozenset(heading_anchors(path.read_text(encoding="utf-8")))


def link_targets(text: str) -> list[str]:
    """Every link and image target of a Markdown text, in order (none from code)."""
    targets = []
    for token in _tokens(text):
        for child in token.children or []:
            if child.type == "link_open":
                targets.append(str(child.attrGet("href") or ""))
            elif child.type == "image":
                targets.append(str(child.attrGet("src") or ""))
    return targets


def broken_links(doc: Path, root: Path) -> list[str]:
    """What is wrong with each relative link of ``doc`` (a Markdown file under ``root``):
    a target outside ``root``, a missing file, an anchor into a non-Markdown file, or an
    anchor no heading of the target has. Empty when every link resolves."""
    problems = []
    name = doc.relative_to(root).as_posix()
    for target in link_targets(doc.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            resolved = doc
        elif path_part.startswith("/"):
            resolved = (root / path_part.lstrip("/")).resolve()
        else:
            resolved = (doc.parent / path_part).resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{name}: {target!r} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{name}: {target!r}: no such file")
        elif anchor and (resolved.is_dir() or resolved.suffix.lower() != ".md"):
            problems.append(f"{name}: {target!r}: an anchor into a non-Markdown file")
        elif anchor and unquote(anchor) not in _anchors_of(resolved):
            where = resolved.relative_to(root.resolve()).as_posix()
            problems.append(f"{name}: {target!r}: no heading '#{anchor}' in {where}")
    return problems


@pytest.mark.parametrize("doc", doc_files(REPO), ids=lambda p: p.relative_to(REPO).as_posix())
def test_repository_docs_have_no_broken_links(doc: Path) -> None:
    assert broken_links(doc, REPO) == []


def test_the_docs_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in doc_files(REPO)}
    assert {"README.md", "docs/ARCHITECTURE.md", "docs/api.md", "docs/security.md"} <= names


def test_github_slugs() -> None:
    text = "\n\n".join(
        [
            "# Loading, keep_alive and the memory budget",
            "## `ggufserve doctor`",
            "## Grammars: `make bench-structured`",
            "## The CPU build's flags, and AMX",
            "## See [the API](api.md) & more",
            "## Usage",
            "## Usage",
            "## Usage",
        ]
    )
    assert heading_anchors(text) == {
        "loading-keep_alive-and-the-memory-budget",
        "ggufserve-doctor",
        "grammars-make-bench-structured",
        "the-cpu-builds-flags-and-amx",
        "see-the-api--more",
        "usage",
        "usage-1",
        "usage-2",
    }


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_checker_catches_a_missing_file(tmp_path: Path) -> None:
    _write(tmp_path, {"README.md": "See [the API](docs/api.md) and [a gone page](docs/gone.md).\n"})
    _write(tmp_path, {"docs/api.md": "# API\n"})
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: 'docs/gone.md': no such file"
    ]


def test_checker_catches_a_missing_anchor(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "docs/a.md": "# A\n\n[ok](b.md#real-heading), [local](#a), "
            "[bad](b.md#no-such-heading)\n",
            "docs/b.md": "# B\n\n## Real heading\n",
        },
    )
    assert broken_links(tmp_path / "docs" / "a.md", tmp_path) == [
        "docs/a.md: 'b.md#no-such-heading': no heading '#no-such-heading' in docs/b.md"
    ]


def test_checker_skips_code_and_external_links_but_not_escapes(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "README.md": (
                "[web](https://example.com/x.md) [mail](mailto:a@b.c) `[code](gone.md)`\n\n"
                "```\n[fenced](gone.md)\n```\n\n"
                "![picture](docs/missing.png) [outside](../elsewhere/DESIGN.md)\n"
            )
        },
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: 'docs/missing.png': no such file",
        "README.md: '../elsewhere/DESIGN.md' points outside the repository",
    ]
