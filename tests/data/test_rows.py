"""Bad rows in input files: a malformed row stops the run naming its file and line; rows without
text are skipped and counted (meta.json and one printed line), never dropped silently. `~` and
`$VAR` in data paths are expanded; an unset variable is refused."""

import json

import numpy as np
import pytest

from experiments.data_faults import BAD_ROWS, write_rows
from h64lm.data import DataConfig, prepare_corpus

from .helpers import documents, expected_stream, write_parquet


def _cfg(tmp_path, path, **kw):
    return DataConfig(name="text", path=str(path), seq_len=16, val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("name, rows, expect", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_rows(tmp_path, tokenizer, capfd, name, rows, expect):
    docs = documents(100)
    path = write_rows(tmp_path / "rows.jsonl", rows, docs)
    if expect.startswith("error: "):
        with pytest.raises(ValueError) as e:
            prepare_corpus(_cfg(tmp_path, path), tokenizer)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"data.path={path}: "), message
        assert expect.removeprefix("error: ") in message
        return
    corpus = prepare_corpus(_cfg(tmp_path, path), tokenizer)
    kept = [d for i, d in enumerate(docs) if i % 4]  # the rows write_rows gave the field
    both = np.concatenate([corpus.train, corpus.val])
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, kept).tolist())
    count = int(expect.removeprefix("skipped: "))
    assert corpus.meta["skipped"]["data.path"] == {
        "rows": 100, "no_text": count, "empty": 0, "first": f"{path} line 1"}
    out = [line for line in capfd.readouterr().out.splitlines() if "skipped" in line]
    assert len(out) == 1 and out[0].startswith(f"data.path: skipped {count} of 100 rows"), out
    prepare_corpus(_cfg(tmp_path, path), tokenizer)  # from the cache: the line again
    assert sum("skipped" in line for line in capfd.readouterr().out.splitlines()) == 1


def test_blank_and_null_texts_are_counted(tmp_path, tokenizer):
    docs = documents(20)
    rows = [json.dumps({"text": d}) for d in docs] + ['{"text": null}', '{"text": "  "}', ""]
    path = write_rows(tmp_path / "rows.jsonl", rows, docs)
    corpus = prepare_corpus(_cfg(tmp_path, path), tokenizer)
    assert corpus.meta["skipped"]["data.path"] == {
        "rows": 22, "no_text": 1, "empty": 1, "first": f"{path} line 21"}


def test_parquet_nulls_counted_and_non_strings_refused(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(20)
    pq.write_table(pa.table({"text": docs + [None, " "]}), tmp_path / "a.parquet")
    corpus = prepare_corpus(_cfg(tmp_path, tmp_path / "a.parquet"), tokenizer)
    assert corpus.meta["skipped"]["data.path"] == {
        "rows": 22, "no_text": 1, "empty": 1, "first": None}
    both = np.concatenate([corpus.train, corpus.val])
    assert sorted(both.tolist()) == sorted(expected_stream(tokenizer, docs).tolist())
    write_parquet(tmp_path / "b.parquet", docs)
    with pytest.raises(ValueError, match=r"data.text_field='id' of data.path=.*b.parquet holds "
                                         r"int64, not strings"):
        prepare_corpus(_cfg(tmp_path, tmp_path / "b.parquet", text_field="id"), tokenizer)


def test_home_and_env_vars_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("H64LM_TEST_DATA", str(tmp_path / "data"))
    cfg = DataConfig(name="text", path="$H64LM_TEST_DATA/a.txt", val_path="~/v.txt",
                     cache_dir="${H64LM_TEST_DATA}/cache")
    assert (cfg.path, cfg.val_path, cfg.cache_dir) == (
        f"{tmp_path}/data/a.txt", f"{tmp_path}/v.txt", f"{tmp_path}/data/cache")
    monkeypatch.delenv("H64LM_NOT_SET", raising=False)
    with pytest.raises(ValueError, match=r"^data.path=\$H64LM_NOT_SET/a.txt: environment variable "
                                         r"\$H64LM_NOT_SET is not set; set it or write the path"):
        DataConfig(name="text", path="$H64LM_NOT_SET/a.txt")
