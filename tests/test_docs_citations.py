"""Every citation of the design document resolves inside the repository (issue 26, item 4).

Docstrings, comments and docs cite ``docs/methods.md`` by section and numbered item. The forms in use:

- ``methods.md §5.3``, ``docs/methods.md §5.3``, a range ``§3.3-3.6``;
- ``§6.2 item 3``, ``§6.4 items 5-6``, ``§8 items 23 and 25``, ``§3.3 step 4``, ``§3.3 step 4.3`` (sub-item 3
  of item 4), ``§3.3 steps 1-2``;
- ``methods.md Decisions item 0``, ``methods.md, Decisions item 1``, ``Decisions 0``, ``decision 1``;
- ``methods.md`` (sections 3.6, 4.4) and comma / "and" lists of all of these: ``§3, §8 items 1-6``,
  ``§3.2, Decisions item 1``, ``§6.2 and §6.5``;
- bare ``§4.2`` or ``Decisions item 2`` in a file that already named the document, which the same grammar reads.

A ``§`` right after another document's name (``stack.md §4``) is that document's section, not ours. A
``methods.md`` followed by anything else (``"methods.md" in text``) is a mention, not a citation. A citation
that starts like one (``§``, ``Decisions``) but does not parse fails the test with its file and line.

Targets in ``docs/methods.md``: every heading ``## N. Title`` / ``### N.M Title`` and ``## Decisions`` is a
section; the numbered list items under it (``1.`` at column 0, sub-items indented under their item) are its
items.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
SELF = Path(__file__).resolve()
SCANNED = ("prunedlora", "scripts", "tests", "configs", "docs", "README.md")
"""Where citations are read (files under these paths, relative to the repository root)."""
SKIPPED_DIRS = {".git", ".venv", ".venv-serving", ".pytest_cache", ".ruff_cache", ".mypy_cache", "__pycache__",
                "build", "dist", "outputs", "multirun", "runs", "wandb"}
"""Directories never read: environments, caches and run outputs (the .gitignore's), not the project's files."""

BRIEF_PATH = re.compile(r"shared/docs")


# ------------------------------------------------------------------------------------------ citations
@dataclass(frozen=True)
class Ref:
    """One target: a section (``"3.2"``, ``"8"``, ``"Decisions"``) and optionally an item path (``(4, 3)``)."""

    section: str
    item: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.section == "Decisions":
            return "Decisions item " + ".".join(map(str, self.item)) if self.item else "Decisions"
        suffix = " item " + ".".join(map(str, self.item)) if self.item else ""
        return f"§{self.section}{suffix}"


@dataclass(frozen=True)
class Citation:
    where: str
    """``path:line`` of the citation's start."""
    text: str
    refs: tuple[Ref, ...]
    doc: str = "methods"
    """The cited document's name (``methods``; ``stack`` for ``stack.md §4``)."""


class CitationError(ValueError):
    """A citation that starts like one but does not parse; the message names the file and line."""


NUM = r"\d+(?:\.\d+)*"
_SECTION = re.compile(rf"§\s?({NUM})(?:\s*[-–]\s*({NUM}))?")
_ITEM_WORD = re.compile(r"\s+(?:items?|steps?)\s+")
_NUMBER = re.compile(rf"({NUM})(?:\s*[-–]\s*(\d+))?")
_NUMBER_SEP = re.compile(r"\s*(?:,\s*(?:and\s+)?|\s+and\s+)(?=\d)")
_DECISION = re.compile(r"decisions?(?:\s+items?)?\s+(?=\d)", re.IGNORECASE)
_SECTIONS_WORD = re.compile(r"sections?\s+(?=\d)", re.IGNORECASE)
_LIST_SEP = re.compile(r"\s*(?:,\s*(?:and\s+)?|\s+and\s+)(?=§|decisions?\b)", re.IGNORECASE)
_ANCHOR = re.compile(r"methods\.md")
_LEAD = re.compile(r"[`'\"]*\s*,?\s*\(?\s*")
_STARTS = re.compile(r"§|decisions?\b|sections?\s+\d", re.IGNORECASE)
_BARE = re.compile(r"§|\bDecisions item\b")
_OTHER_DOC = re.compile(r"([\w./-]+)\.md[`'\"]*\s*,?\s*$")


def _fail(where: str, text: str, pos: int, why: str) -> CitationError:
    return CitationError(f"{where}: cannot parse the citation at {text[pos:pos + 40]!r}: {why}")


def _split(number: str) -> tuple[int, ...]:
    return tuple(int(part) for part in number.split("."))


def _section_range(first: str, last: str | None) -> list[str] | None:
    """``3.3``-``3.6`` -> every section in between; None when the ends do not make a range."""
    if last is None:
        return [first]
    a, b = _split(first), _split(last)
    if len(a) != len(b) or a[:-1] != b[:-1] or b[-1] < a[-1]:
        return None
    return [".".join(map(str, (*a[:-1], k))) for k in range(a[-1], b[-1] + 1)]


def _numbers(text: str, pos: int, where: str) -> tuple[list[tuple[int, ...]], int]:
    """``5-6``, ``23 and 25``, ``1, 2``, ``4.3`` -> item paths, and the position after them."""
    found: list[tuple[int, ...]] = []
    while True:
        m = _NUMBER.match(text, pos)
        if m is None:
            raise _fail(where, text, pos, "expected a number")
        start = _split(m.group(1))
        if m.group(2) is None:
            found.append(start)
        elif len(start) == 1 and int(m.group(2)) >= start[0]:
            found.extend((k,) for k in range(start[0], int(m.group(2)) + 1))
        else:
            raise _fail(where, text, pos, "a range needs two whole numbers, the second not below the first")
        pos = m.end()
        sep = _NUMBER_SEP.match(text, pos)
        if sep is None:
            return found, pos
        pos = sep.end()


def _reference(text: str, pos: int, where: str) -> tuple[list[Ref], int]:
    """One reference (a section with optional items, a Decisions item, or ``sections N, M``) at ``pos``."""
    m = _SECTION.match(text, pos)
    if m is not None:
        sections = _section_range(m.group(1), m.group(2))
        if sections is None:
            raise _fail(where, text, pos, "not a section range")
        words = _ITEM_WORD.match(text, m.end())
        if words is None:
            return [Ref(s) for s in sections], m.end()
        if len(sections) > 1:
            raise _fail(where, text, pos, "items of a section range")
        items, end = _numbers(text, words.end(), where)
        return [Ref(sections[0], item) for item in items], end
    m = _DECISION.match(text, pos)
    if m is not None:
        items, end = _numbers(text, m.end(), where)
        return [Ref("Decisions", item) for item in items], end
    m = _SECTIONS_WORD.match(text, pos)
    if m is not None:
        numbers, end = _numbers(text, m.end(), where)
        return [Ref(".".join(map(str, n))) for n in numbers], end
    raise _fail(where, text, pos, "expected §N[.M], 'Decisions item N' or 'sections N'")


def parse_citation(text: str, pos: int, where: str) -> tuple[tuple[Ref, ...], int]:
    """A list of references joined by commas or "and", starting at ``pos``; returns them and the end."""
    refs: list[Ref] = []
    while True:
        found, pos = _reference(text, pos, where)
        refs.extend(found)
        sep = _LIST_SEP.match(text, pos)
        if sep is None:
            return tuple(refs), pos
        pos = sep.end()


def find_citations(text: str, path: str) -> list[Citation]:
    """Every citation in ``text`` (anchored ``methods.md ...`` ones first, then bare ``§``/``Decisions item``).

    Raises:
        CitationError: a citation that starts like one but does not parse, naming ``path:line``.
    """
    def where(pos: int) -> str:
        return f"{path}:{text.count(chr(10), 0, pos) + 1}"

    citations, consumed = [], []
    for anchor in _ANCHOR.finditer(text):
        start = _LEAD.match(text, anchor.end()).end()
        if not _STARTS.match(text, start):
            continue  # a mention of the file, not a citation of a section
        refs, end = parse_citation(text, start, where(anchor.start()))
        citations.append(Citation(where(anchor.start()), text[anchor.start():end], refs))
        consumed.append((anchor.start(), end))
    for bare in _BARE.finditer(text):
        if any(a <= bare.start() < b for a, b in consumed):
            continue
        refs, end = parse_citation(text, bare.start(), where(bare.start()))
        other = _OTHER_DOC.search(text, max(0, bare.start() - 80), bare.start())
        doc = other.group(1).rsplit("/", 1)[-1] if other is not None else "methods"
        citations.append(Citation(where(bare.start()), text[bare.start():end], refs, doc))
        consumed.append((bare.start(), end))
    return citations


# ------------------------------------------------------------------------------------------ the document
_HEADING = re.compile(r"^#{1,6}\s")
_NUMBERED_HEADING = re.compile(rf"^#{{1,6}}\s+(?:({NUM})\.?(?:\s|$)|(Decisions)\b)")
_LIST_ITEM = re.compile(r"^( *)(\d+)\.\s")


def doc_targets(markdown: str) -> set[Ref]:
    """Every section (numbered headings, ``Decisions``) and every numbered item under it, nested by indent."""
    targets: set[Ref] = set()
    section, stack, fenced = None, [], False  # stack: (indent, number) of the enclosing items
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or line.lstrip().startswith("```"):
            continue
        heading = _NUMBERED_HEADING.match(line)
        if heading is not None:
            section, stack = heading.group(1) or heading.group(2), []
            targets.add(Ref(section))
            continue
        if _HEADING.match(line):
            stack = []  # an unnumbered subheading: same section, a new list
            continue
        item = _LIST_ITEM.match(line)
        if item is not None and section is not None:
            indent = len(item.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, int(item.group(2))))
            targets.add(Ref(section, tuple(n for _, n in stack)))
    return targets


# ------------------------------------------------------------------------------------------ files
def _text(path: Path) -> str | None:
    """The file's text, or None for binary files (images, archives)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for child in sorted(path.iterdir()):
        if child.is_dir() and (child.name in SKIPPED_DIRS or child.name.endswith(".egg-info")):
            continue
        yield from _walk(child)


def text_files(root: Path, under: tuple[str, ...] | None = None) -> Iterator[tuple[str, str]]:
    """``(path relative to root, text)`` of every text file under ``under`` (default: the whole tree), this test
    file excepted (its examples are citations and brief paths on purpose)."""
    for top in (root / name for name in under) if under is not None else (root,):
        if not top.exists():
            continue
        for path in _walk(top):
            text = _text(path) if path.resolve() != SELF else None
            if text is not None:
                yield path.relative_to(root).as_posix(), text


def repo_citations() -> list[Citation]:
    return [c for rel, text in text_files(ROOT, SCANNED) for c in find_citations(text, rel)]


def brief_references(root: Path) -> list[str]:
    """``path:line: line`` of every line of the tree at ``root`` that names the internal brief's folder."""
    return [f"{rel}:{n}: {line.strip()}" for rel, text in text_files(root)
            for n, line in enumerate(text.splitlines(), 1) if BRIEF_PATH.search(line)]


# ------------------------------------------------------------------------------------------ the parser
def R(section: str, *item: int) -> Ref:
    """Shorthand for the expected references below."""
    return Ref(section, tuple(item))


@pytest.mark.parametrize("text, refs", [
    ("(methods.md §4), with", [R("4")]),
    ("see docs/methods.md §5.3.", [R("5.3")]),
    ("(default 2 r0: methods.md §8 item 5)", [R("8", 5)]),
    ("(methods.md §3, §8 items 1-6); module shapes", [R("3"), *(R("8", k) for k in range(1, 7))]),
    ("(methods.md §2, §8 item 26).", [R("2"), R("8", 26)]),
    ("(methods.md §6.3, §6.4 items 5-6).", [R("6.3"), R("6.4", 5), R("6.4", 6)]),
    ("(methods.md §6.3-6.4, §8 items 23 and 25): bitmap", [R("6.3"), R("6.4"), R("8", 23), R("8", 25)]),
    ("(methods.md §3.2, Decisions item 1), kept", [R("3.2"), R("Decisions", 1)]),
    ("(methods.md, Decisions item 0, the erratum): the", [R("Decisions", 0)]),
    ("Pruning methods, methods.md Decisions 0.", [R("Decisions", 0)]),
    ("(methods.md decision 1; scripts", [R("Decisions", 1)]),
    ("methods.md §3.3-3.6:", [R("3.3"), R("3.4"), R("3.5"), R("3.6")]),
    ("methods.md §6.2 and §6.5:", [R("6.2"), R("6.5")]),
    ("(methods.md §6.2 item\n    3; the exact SVD", [R("6.2", 3)]),
    ("(methods.md §3.3 step 4).", [R("3.3", 4)]),
    ("``../shared/docs/methods.md`` (sections 3.6, 4.4, 5.5, 6.5).", [R("3.6"), R("4.4"), R("5.5"), R("6.5")]),
    ("(`../shared/docs/methods.md`, Decisions item 0).", [R("Decisions", 0)]),
])
def test_parser_reads_every_citation_form_in_use(text: str, refs: list[Ref]) -> None:
    citations = find_citations(text, "x.py")
    assert len(citations) == 1
    assert list(citations[0].refs) == refs
    assert citations[0].doc == "methods"


def test_bare_citations_are_read_too_and_other_documents_are_told_apart() -> None:
    text = ('"""Attach (§3.3 steps 1-2).\n\n'
            "update (§3.3 step 4.3, §8 item 6). Two modes (Decisions item 2, §8 item 7):\n"
            "Masks during training (stack.md §4-5): nothing is reshaped. (§2 Procedure)\n")
    citations = find_citations(text, "m.py")
    assert [(c.where, c.doc, [str(r) for r in c.refs]) for c in citations] == [
        ("m.py:1", "methods", ["§3.3 item 1", "§3.3 item 2"]),
        ("m.py:3", "methods", ["§3.3 item 4.3", "§8 item 6"]),
        ("m.py:3", "methods", ["Decisions item 2", "§8 item 7"]),
        ("m.py:4", "stack", ["§4", "§5"]),
        ("m.py:4", "methods", ["§2"]),
    ]


def test_a_mention_of_the_file_is_not_a_citation() -> None:
    assert find_citations('assert "methods.md" in text and "Compare with" in text\n', "t.py") == []
    assert find_citations("The design notes live in docs/methods.md; read them first.\n", "README.md") == []


@pytest.mark.parametrize("text", ["line one\nsee methods.md §X for why", "x\n\ny (methods.md Decisions item N)",
                                  "a\nb\n(§8 items 6-4)"])
def test_an_unparseable_citation_fails_naming_file_and_line(text: str) -> None:
    line = text.count("\n") + 1
    with pytest.raises(CitationError, match=rf"^bad\.py:{line}: cannot parse the citation at "):
        find_citations(text, "bad.py")


def test_doc_targets_are_numbered_headings_and_nested_items() -> None:
    markdown = ("# Title\n\n## Decisions\n\n0. **Zero.** text\n   wrapped line\n1. One.\n\n## 3. Method\n\n"
                "### 3.3 Procedure\n\n1. Wrap.\n4. Before the step:\n   1. mask;\n   3. zero moments.\n"
                "5. Update.\n\n```\n7. not an item\n## 9. not a heading\n```\n\n#### Notes\n\n2. Another list.\n")
    assert doc_targets(markdown) == {
        R("Decisions"), R("Decisions", 0), R("Decisions", 1), R("3"), R("3.3"), R("3.3", 1), R("3.3", 4),
        R("3.3", 4, 1), R("3.3", 4, 3), R("3.3", 5), R("3.3", 2),
    }


# ------------------------------------------------------------------------------------------ the repository
def test_every_citation_in_the_repo_resolves_in_docs_methods_md() -> None:
    targets = doc_targets(DOC.read_text(encoding="utf-8"))
    citations = [c for c in repo_citations() if c.doc == "methods"]
    missing = [f"{c.where}: {c.text!r} -> {ref}" for c in citations for ref in c.refs if ref not in targets]
    assert not missing, "citations with no heading or numbered item in docs/methods.md:\n" + "\n".join(missing)


def test_citations_are_found_in_every_scanned_tree() -> None:
    """Guards the scanner itself: a parser that silently found nothing would pass the test above."""
    trees = {c.where.split("/", 1)[0].split(":", 1)[0] for c in repo_citations() if c.doc == "methods"}
    assert {"prunedlora", "scripts", "tests", "configs", "docs", "README.md"} <= trees


def test_the_documents_own_numbering_covers_the_decisions_and_open_questions() -> None:
    targets = doc_targets(DOC.read_text(encoding="utf-8"))
    assert {R("Decisions", k) for k in range(6)} <= targets
    assert {R("8", k) for k in range(1, 27)} <= targets
    assert {R(str(k)) for k in range(10)} <= targets


def test_brief_references_finds_the_internal_brief_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text('"""See ../shared/docs/methods.md §3."""\n')
    (tmp_path / "README.md").write_text("Design: docs/methods.md.\nData: ../shared/data.\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "x.py").write_text("shared/docs\n")  # environments are not the project's files
    (tmp_path / "img.png").write_bytes(b"\x89PNG\0shared/docs")
    assert brief_references(tmp_path) == ['pkg/a.py:1: """See ../shared/docs/methods.md §3."""']


def test_no_file_refers_to_the_internal_brief() -> None:
    found = brief_references(ROOT)
    assert not found, "the internal brief is not in the repository; cite docs/methods.md:\n" + "\n".join(found)


def test_every_cited_document_is_in_the_repo() -> None:
    absent = [f"{c.where}: {c.text!r} ({c.doc}.md)" for c in repo_citations()
              if c.doc != "methods" and not (ROOT / "docs" / f"{c.doc}.md").exists()]
    assert not absent, "citations of documents not in docs/:\n" + "\n".join(absent)
