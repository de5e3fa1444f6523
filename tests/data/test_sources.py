import numpy as np
import pytest

from h64lm.data import DataConfig, prepare_corpus, sources
from h64lm.data.files import split_txt

from .helpers import documents, expected_stream, write_jsonl, write_parquet, write_txt


def _text_cfg(tmp_path, **kw):
    return DataConfig(name="text", seq_len=16, cache_dir=str(tmp_path / "cache"), **kw)


def test_split_txt_modes():
    wikitext = " = A = \n x \n\n = = Sub = = \n y \n = B = \n z \n"
    assert split_txt(wikitext, "wikitext") == ["= A = \n x \n\n = = Sub = = \n y", "= B = \n z"]
    assert split_txt(wikitext, "auto") == split_txt(wikitext, "wikitext")
    assert split_txt("p1 line\nmore\n\n  \np2\n\n\n", "auto") == ["p1 line\nmore", "p2"]
    assert split_txt("p1\n\np2", "file") == ["p1\n\np2"]


def test_wikitext2_valid_txt(tmp_path, tokenizer, wikitext2_valid):
    corpus = prepare_corpus(_text_cfg(tmp_path, path=str(wikitext2_valid)), tokenizer)
    text = wikitext2_valid.read_text()
    articles = split_txt(text, "wikitext")
    assert len(articles) == sum(1 for line in text.splitlines()
                                if line.startswith(" = ") and not line.startswith(" = = "))
    assert corpus.meta["documents"] == {"train": len(articles) - corpus.meta["documents"]["val"],
                                        "val": corpus.meta["documents"]["val"]}
    assert corpus.meta["documents"]["val"] >= 1
    both = np.concatenate([corpus.train, corpus.val])
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, articles).tolist())


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_file_with_val_path(tmp_path, tokenizer, kind):
    write = {"txt": write_txt, "jsonl": write_jsonl, "parquet": write_parquet}[kind]
    train_docs, val_docs = documents(12), documents(3, tag="held out")
    train = write(tmp_path / f"train.{kind}", train_docs)
    val = write(tmp_path / f"val.{kind}", val_docs)
    corpus = prepare_corpus(_text_cfg(tmp_path, path=str(train), val_path=str(val)), tokenizer)
    assert np.array_equal(corpus.train, expected_stream(tokenizer, train_docs))
    assert np.array_equal(corpus.val, expected_stream(tokenizer, val_docs))
    assert corpus.train.dtype == np.uint16 and corpus.meta["dtype"] == "uint16"


def test_folder_text_field_and_val_fraction(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs_a, docs_b = documents(20, tag="a"), documents(20, tag="b")
    write_jsonl(folder / "a.jsonl", docs_a, field="body")
    write_jsonl(folder / "sub" / "b.jsonl", docs_b, field="body")
    cfg = _text_cfg(tmp_path, path=str(folder), text_field="body", val_fraction=0.2)
    corpus = prepare_corpus(cfg, tokenizer)
    assert corpus.meta["documents"]["train"] + corpus.meta["documents"]["val"] == 40
    assert 4 <= corpus.meta["documents"]["val"] <= 12
    both = np.concatenate([corpus.train, corpus.val])
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, docs_a + docs_b).tolist())


def test_max_samples(tmp_path, tokenizer):
    docs = documents(10)
    cfg = _text_cfg(tmp_path, path=str(write_jsonl(tmp_path / "d.jsonl", docs)),
                    val_path=str(write_jsonl(tmp_path / "v.jsonl", docs)), max_samples=4)
    assert np.array_equal(prepare_corpus(cfg, tokenizer).train,
                          expected_stream(tokenizer, docs[:4]))


@pytest.mark.parametrize("name", ["wikitext2", "wikitext103"])
def test_hub_sources_fail_fast_offline(tmp_path, tokenizer, name):
    cfg = DataConfig(name=name, hub_config=f"{name}-raw-v1", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"unreachable \(HF_HUB_OFFLINE=1\).*data=wiki_excerpt"
                                           r".*data=text data.path="):
        prepare_corpus(cfg, tokenizer)


def test_hub_unreachable_without_offline_flag(tmp_path, tokenizer, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    cfg = DataConfig(name="wikitext2", hub_config="wikitext-2-raw-v1", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"unreachable \(no connection\).*data=wiki_excerpt"):
        prepare_corpus(cfg, tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loading_path_on_local_rows(tmp_path, tokenizer, monkeypatch, streaming,
                                        wikitext2_valid):
    """The hub code path, fed WikiText rows (lines with their newline) from the local file."""
    from datasets import Dataset

    rows = wikitext2_valid.read_text().splitlines(keepends=True)
    calls = []

    def fake_load_dataset(repo, config, split, streaming, cache_dir):
        calls.append((repo, config, split, streaming))
        ds = Dataset.from_dict({"text": rows})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(sources, "hub_available", lambda: True)
    cfg = DataConfig(name="wikitext2", hub_config="wikitext-2-raw-v1", streaming=streaming,
                     max_samples=400, cache_dir=str(tmp_path))
    corpus = prepare_corpus(cfg, tokenizer)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", s, streaming)
                     for s in ("train", "validation")]
    articles = split_txt("".join(rows[:400]), "wikitext")
    assert len(articles) >= 2
    assert np.array_equal(corpus.train, expected_stream(tokenizer, articles))
    assert np.array_equal(corpus.val, corpus.train)
