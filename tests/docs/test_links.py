"""Links and file names in the docs resolve; the code points at docs files, not README headings.

- Every relative link and image of README.md and docs/*.md names a file that exists, and its
  `#anchor` a heading of that file (GitHub's rule: lower case, punctuation dropped, spaces to -).
- Every repository path written in backticks in the docs (`h64lm/train/wrap.py`, `conf/...`)
  exists, and so does every `h64lm/...` / `experiments/...` file named in the code's comments.
- No module under h64lm/ or experiments/ refers to a README heading: they link docs/ files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.commands import DOCS, ROOT

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_PATH = re.compile(r"`((?:h64lm|experiments|tests|conf|docs)/[\w./-]*?)`")
_CODE_PATH = re.compile(r"\b((?:h64lm|experiments)/[\w/]+\.(?:py|sh|md))\b")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else _HEADING.match(line)
        if m:
            found.add(slug(m.group(2)))
    return found


def test_slug_follows_github():
    assert slug("Starting from another run's weights: `train.init_from`") == \
        "starting-from-another-runs-weights-traininit_from"
    assert slug("MoE research: balancing, routing you can see, and does MoE pay?") == \
        "moe-research-balancing-routing-you-can-see-and-does-moe-pay"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(doc: Path):
    broken = []
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_files_exist(doc: Path):
    missing = [p for p in _PATH.findall(doc.read_text())
               if "*" not in p and "<" not in p and not (ROOT / p).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def _sources() -> list[Path]:
    return sorted([*(ROOT / "h64lm").rglob("*.py"), *(ROOT / "experiments").glob("*.py"),
                   *(ROOT / "experiments").glob("*.sh")])


def test_code_names_existing_files():
    missing = [f"{src.relative_to(ROOT)}: {p}" for src in _sources()
               for p in _CODE_PATH.findall(src.read_text()) if not (ROOT / p).exists()]
    assert not missing, "comments or docstrings name files that do not exist: " + "; ".join(missing)


def test_code_links_docs_not_readme_headings():
    found = [f"{src.relative_to(ROOT)}:{i}: {line.strip()}" for src in _sources()
             for i, line in enumerate(src.read_text().splitlines(), 1) if "README" in line]
    assert not found, "point at the docs/ file instead of the README: " + "; ".join(found)


def test_readme_is_a_front_page():
    """The README holds what a newcomer needs on a few screens; the rest lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", "\n".join(lines)))
    assert docs <= linked, f"docs files the README does not link: {sorted(docs - linked)}"
