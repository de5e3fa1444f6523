"""Small corpora written by tests, and the token stream they must produce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def documents(n: int, words: int = 40, tag: str = "doc") -> list[str]:
    """`n` distinct short English-like documents."""
    vocab = ["river", "stone", "music", "winter", "garden", "engine", "market", "history"]
    return [f"{tag} {i}: " + " ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(words))
            + "." for i in range(n)]


def expected_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """The reference layout: each document as BOS ids EOS, one after the other."""
    return np.array([t for d in docs for t in tokenizer.encode(d, bos=True, eos=True)])


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
    return path


def write_wikitext(path: Path, articles: int = 12) -> Path:
    """Wikipedia excerpt articles in WikiText's raw layout (` = Title = ` lines, ` = = Heading = = `
    subsections, punctuation spaced out, `@-@` / `@,@` / `@.@` inside words and numbers, and words
    seen once replaced by `<unk>`), so WikiText parsing is tested from the repository alone."""
    import itertools
    import re
    from collections import Counter

    from h64lm.data.wiki import wiki_articles

    def spaced(line: str) -> str:
        line = re.sub(r"(?<=\w)([-,.])(?=\w)", r" @\1@ ", line)
        return re.sub(r"\s*([,.;:!?()\"])\s*", r" \1 ", line).split()

    docs = [(title, [spaced(p) for p in text.split("\n")[1:] if p.strip()])
            for title, text in itertools.islice(wiki_articles(), articles)]
    counts = Counter(w for _, paras in docs for words in paras for w in words)
    lines = []
    for title, paras in docs:
        lines += [f" = {title} = ", ""]
        for i, words in enumerate(paras):
            words = [w if counts[w] > 1 else "<unk>" for w in words]
            heading = i and len(words) <= 4 and words[-1] not in {".", "?", "!"}
            lines += [f" = = {' '.join(words)} = = " if heading else f" {' '.join(words)} ", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
