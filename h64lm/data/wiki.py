"""The offline default corpus: the Wikipedia excerpt that ships inside gensim's wheel.

`gensim/test/test_data/enwiki-latest-pages-articles1.xml-...-shortened.bz2` holds real English
Wikipedia articles (text under CC BY-SA; see docs/data.md). gensim's `filter_wiki` removes
templates, links and tags but leaves bold/italic quotes, `==Heading==` lines, list markers,
blank runs and the holes left by removed templates; `clean_wiki` turns that into plain paragraphs
with headings, and drops the reference-like sections that are lists of citations.
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

__all__ = ["WIKI_EXCERPT_VERSION", "clean_wiki", "excerpt_text", "wiki_articles", "wiki_excerpt_file"]

# Bump when cleaning changes, so cached token files built with the old cleaning are not reused.
WIKI_EXCERPT_VERSION = 1
_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Sections made of citations and link lists, not prose.
_DROPPED_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "footnotes", "sources", "citations", "notes and references", "works cited",
}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_IMAGE_SIZE = re.compile(r"^\d+(x\d+)?px$")


def wiki_excerpt_file() -> Path:
    path = Path(str(resources.files("gensim") / "test" / "test_data" / _DUMP))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: install gensim (requirements.txt) or choose another source, "
            "e.g. data=text data.path=<file or folder>"
        )
    return path


def _clean_line(line: str) -> str:
    line = _EMPHASIS.sub("", line)
    line = _EMPTY_BRACKETS.sub("", line)
    line = _SPACES.sub(" ", line)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()


def clean_wiki(title: str, filtered: str) -> str:
    """Plain text of one article after `filter_wiki`: the title, then paragraphs and headings.

    Paragraphs are separated by a blank line; list items keep one line each; headings become
    their text on a line of its own. Returns "" when nothing readable is left.
    """
    lines: list[str] = [title, ""]
    dropping = False
    for raw in filtered.splitlines():
        heading = _HEADING.match(raw.strip())
        if heading:
            text = _clean_line(heading.group(2))
            dropping = text.lower() in _DROPPED_SECTIONS
            if not dropping and text:
                lines += ["", text]
            continue
        if dropping:
            continue
        text = _clean_line(_LIST_MARKER.sub("", raw.strip()))
        if _IMAGE_SIZE.match(text):
            continue
        if text or (lines and lines[-1]):
            lines.append(text)
    body = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", body) if body != title else ""


def wiki_articles(path: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, cleaned text) of each article in the dump, skipping redirects and empty pages."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path or wiki_excerpt_file()) as stream:
        for title, markup, _page_id in extract_pages(stream, filter_namespaces=("0",)):
            if markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = clean_wiki(title, filter_wiki(markup))
            if text:
                yield title, text


def excerpt_text(chars: int) -> str:
    """The first `chars` characters of the cleaned articles, blank-line separated: real English
    that every checkout has (tests and benchmarks use it instead of files beside the repository)."""
    parts, size = [], 0
    for _title, text in wiki_articles():
        parts.append(text)
        size += len(text) + 2
        if size >= chars:
            break
    return "\n\n".join(parts)[:chars]
