import multiprocessing as mp
import os

import numpy as np
import pytest

import h64lm.data.prepare as prepare_module
from h64lm.data import DataConfig, load_tokenizer, prepare_corpus
from h64lm.data.cache import build_once

from .helpers import documents, expected_stream, write_jsonl, write_txt


def _cfg(tmp_path, **kw):
    return DataConfig(**{"name": "text", "seq_len": 16, "cache_dir": str(tmp_path / "cache"),
                         **kw})


def _corpus_files(tmp_path, n=30):
    return write_jsonl(tmp_path / "docs.jsonl", documents(n))


def test_second_call_reuses_the_cache(tmp_path, tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, path=str(_corpus_files(tmp_path)), val_fraction=0.2)
    first = prepare_corpus(cfg, tokenizer)
    mtime = (first.path / "train.bin").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a cached corpus must not be read or tokenized again")

    monkeypatch.setattr(prepare_module, "load_documents", fail)
    again = prepare_corpus(cfg, tokenizer)
    other_window = prepare_corpus(_cfg(tmp_path, path=cfg.path, val_fraction=0.2, seq_len=8),
                                  tokenizer)
    assert again.path == other_window.path == first.path
    assert (again.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, first.train) and again.meta == first.meta


def test_changed_source_gets_a_new_cache(tmp_path, tokenizer):
    path = _corpus_files(tmp_path)
    first = prepare_corpus(_cfg(tmp_path, path=str(path), val_fraction=0.2), tokenizer)
    write_jsonl(path, documents(31))
    second = prepare_corpus(_cfg(tmp_path, path=str(path), val_fraction=0.2), tokenizer)
    assert second.path != first.path
    assert second.meta["documents"]["train"] + second.meta["documents"]["val"] == 31


def _prepare_in_child(cfg: DataConfig, barrier) -> dict:
    barrier.wait(timeout=120)  # start both preparations together
    tokenizer = load_tokenizer(cfg)
    corpus = prepare_corpus(cfg, tokenizer)
    return {"meta": corpus.meta, "train": corpus.train.tobytes(), "val": corpus.val.tobytes(),
            "pid": os.getpid(), "path": str(corpus.path)}


def test_two_concurrent_preparers(tmp_path, tokenizer):
    # A fresh cache: both processes also convert the tokenizer at the same time.
    cfg = _cfg(tmp_path, path=str(_corpus_files(tmp_path, n=200)), val_fraction=0.1)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.starmap(_prepare_in_child, [(cfg, barrier), (cfg, barrier)])
    a, b = results
    assert a["pid"] != b["pid"]
    assert a["meta"] == b["meta"] and a["meta"]["built_by_pid"] in (a["pid"], b["pid"])
    assert a["train"] == b["train"] and a["val"] == b["val"] and a["path"] == b["path"]
    docs = documents(200)
    both = np.frombuffer(a["train"] + a["val"], dtype=np.uint16)
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, docs).tolist())
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*.tmp-*")]
    assert leftovers == []


def test_failed_build_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "half.bin").write_bytes(b"12")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(tmp_path / "x", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]
    assert build_once(tmp_path / "x", lambda folder: None) == (tmp_path / "x", True)


def test_missing_path(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"data.path=.*nowhere.txt does not exist"):
        prepare_corpus(_cfg(tmp_path, path=str(tmp_path / "nowhere.txt")), tokenizer)
    with pytest.raises(ValueError, match=r"data.val_path=.*nowhere does not exist"):
        prepare_corpus(_cfg(tmp_path, path=str(_corpus_files(tmp_path)),
                            val_path=str(tmp_path / "nowhere")), tokenizer)


def test_unknown_file_type(tmp_path, tokenizer):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data.path=.*data.csv: unknown file type '.csv'"):
        prepare_corpus(_cfg(tmp_path, path=str(tmp_path / "data.csv")), tokenizer)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"data.path=.*empty_dir holds no .txt/.jsonl/.parquet"):
        prepare_corpus(_cfg(tmp_path, path=str(tmp_path / "empty_dir")), tokenizer)


def test_mixed_file_types(tmp_path, tokenizer):
    write_txt(tmp_path / "a.txt", documents(3))
    write_jsonl(tmp_path / "b.jsonl", documents(3))
    with pytest.raises(ValueError, match=r"mixes file types \['.jsonl', '.txt'\]"):
        prepare_corpus(_cfg(tmp_path, path=str(tmp_path)), tokenizer)


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    cfg = _cfg(tmp_path, path=str(_corpus_files(tmp_path)), val_path=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"the val split is empty \(empty corpus\)"):
        prepare_corpus(cfg, tokenizer)
    with pytest.raises(ValueError, match=r"has 0 document\(s\).*data.val_path"):
        prepare_corpus(_cfg(tmp_path, path=str(tmp_path / "empty.txt")), tokenizer)


def test_corpus_shorter_than_one_window(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, path=str(_corpus_files(tmp_path)), val_fraction=0.2, seq_len=100_000)
    with pytest.raises(ValueError, match=r"data.seq_len=100000: the train split has \d+ tokens, "
                                         r"fewer than one window"):
        prepare_corpus(cfg, tokenizer)


def test_missing_text_field(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, path=str(_corpus_files(tmp_path)), text_field="body")
    with pytest.raises(ValueError, match=r"data.text_field='body' is not a column .*text, id"):
        prepare_corpus(cfg, tokenizer)


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_undecodable_bytes_replaced_with_warning(tmp_path, tokenizer, kind):
    docs = documents(10)
    if kind == "txt":
        raw = "\n\n".join(docs).encode().replace(b"doc 3:", b"doc \xff3:")
    else:
        raw = write_jsonl(tmp_path / "ok.jsonl", docs).read_bytes().replace(b"doc 3:", b"doc \xff3:")
    (tmp_path / f"bad.{kind}").write_bytes(raw)
    cfg = _cfg(tmp_path, path=str(tmp_path / f"bad.{kind}"), val_fraction=0.2)
    with pytest.warns(UserWarning, match=r"undecodable UTF-8 bytes replaced .*bad\." + kind):
        corpus = prepare_corpus(cfg, tokenizer)
    text = tokenizer.decode(np.concatenate([corpus.train, corpus.val]).tolist())
    assert "doc \ufffd3:" in text


@pytest.mark.parametrize("kw, match", [
    ({"seq_len": 0}, r"data.seq_len=0 must be >= 1"),
    ({"name": "wikitext"}, r"data.name='wikitext' must be one of"),
    ({"name": "text"}, r"data=text needs data.path="),
    ({"val_fraction": 1.0}, r"data.val_fraction=1.0 must be >= 0 and < 1"),
    ({"max_samples": 0}, r"data.max_samples=0 must be >= 1, or null"),
    ({"txt_split": "lines"}, r"data.txt_split='lines' must be one of"),
    ({"val_windows": 0}, r"data.val_windows=0 must be >= 1, or null"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)
