"""A damaged token cache or tokenizer cache is found at open and rebuilt, saying so in one line;
the rebuilt data equals a fresh build (the reference: tokenizing the documents directly)."""

import shutil

import numpy as np
import pytest

from experiments.data_faults import CACHE_DAMAGE, TOKENIZER_DAMAGE, damage
from h64lm.data import DataConfig, load_tokenizer, prepare_corpus

from .helpers import documents, expected_stream, write_jsonl


@pytest.mark.parametrize("name, file, how", CACHE_DAMAGE, ids=[c[0] for c in CACHE_DAMAGE])
def test_damaged_token_cache_is_rebuilt(tmp_path, tokenizer, capfd, name, file, how):
    docs = documents(40)
    cfg = DataConfig(name="text", path=str(write_jsonl(tmp_path / "d.jsonl", docs)),
                     val_fraction=0.2, seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = prepare_corpus(cfg, tokenizer)
    capfd.readouterr()
    damage(first.path, file, how)
    again = prepare_corpus(cfg, tokenizer)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("cache:")]
    assert len(err) == 1 and err[0].startswith(f"cache: {first.path} is damaged ("), err
    assert "data.path" not in err[0] and "data.tokenizer" not in err[0]
    both = np.concatenate([again.train, again.val])
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, docs).tolist())
    assert again.meta["tokens"] == first.meta["tokens"]
    assert [p.name for p in (tmp_path / "cache" / "corpus").glob("*.tmp-*")] == []


@pytest.mark.parametrize("name, file, how", TOKENIZER_DAMAGE, ids=[c[0] for c in TOKENIZER_DAMAGE])
def test_damaged_tokenizer_cache_is_rebuilt(tmp_path, session_cache, tokenizer, capfd, name,
                                            file, how):
    cache = tmp_path / "cache"
    shutil.copytree(session_cache / "tokenizers", cache / "tokenizers")  # skip one conversion
    folder = next(p for p in (cache / "tokenizers").iterdir() if p.is_dir())
    damage(folder, file, how)
    again = load_tokenizer(DataConfig(cache_dir=str(cache)))
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("cache:")]
    assert len(err) == 1 and err[0].startswith(f"cache: {folder} is damaged ("), err
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode("The quick brown fox") == [415, 2936, 9060, 285, 1142]  # sentencepiece's
