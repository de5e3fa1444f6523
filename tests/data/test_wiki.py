import re

import numpy as np

from h64lm.data.wiki import clean_wiki

MARKUP = """'''Lobster''' is an ''animal'' (; ) with claws .


==Biology==
It lives in the sea , mostly.
* Item one
*
:374px
===Diet===
Fish.
==References==
* Smith 2001
==External links==
* example.org
"""


def test_clean_wiki_markup():
    text = clean_wiki("Lobster", MARKUP)
    assert text == ("Lobster\n\nLobster is an animal with claws.\n\nBiology\n"
                    "It lives in the sea, mostly.\nItem one\n\nDiet\nFish.")


def test_clean_wiki_empty_article():
    assert clean_wiki("Empty", "\n\n==References==\n* x\n") == ""


def test_wiki_excerpt_split_by_article(wiki_corpus, tokenizer):
    meta = wiki_corpus.meta
    assert meta["documents"]["train"] + meta["documents"]["val"] > 100
    assert meta["documents"]["val"] >= 1
    share = meta["tokens"]["val"] / (meta["tokens"]["val"] + meta["tokens"]["train"])
    assert 0.02 < share < 0.15
    # Every document is `BOS text EOS`, so the BOS count is the document count.
    assert int((wiki_corpus.train == tokenizer.bos_id).sum()) == meta["documents"]["train"]
    val_titles = set(_titles(wiki_corpus.val, tokenizer))
    train_titles = set(_titles(wiki_corpus.train, tokenizer))
    assert len(val_titles) == meta["documents"]["val"] and not val_titles & train_titles


def test_wiki_excerpt_has_no_markup_left(wiki_corpus, tokenizer):
    text = tokenizer.decode(np.asarray(wiki_corpus.val).tolist())
    assert "'''" not in text and "''" not in text
    assert not re.search(r"^=+.*=+$", text, re.MULTILINE)
    assert not re.search(r"^\s*[*#]", text, re.MULTILINE)


def _titles(tokens, tokenizer):
    starts = np.flatnonzero(np.asarray(tokens) == tokenizer.bos_id)
    return [tokenizer.decode(np.asarray(tokens[s:s + 30]).tolist()).split("\n")[0] for s in starts]


