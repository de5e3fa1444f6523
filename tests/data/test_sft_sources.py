"""Conversation sources: each row layout, bad rows, the hub presets offline and on local rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from h64lm.data.chat import ChatFormat, Message
from h64lm.data.config import DataConfig
from h64lm.data.sft_sources import (
    detect_format,
    encode_conversations,
    load_conversations,
    read_conversation_files,
)
from h64lm.data.sources import load_documents
from h64lm.data.tasks.arithmetic import make_splits, write_split

U, A, S = "user", "assistant", "system"

# (row, the conversation a reader must make of it), one per layout
ROWS = {
    "alpaca": ({"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               [Message(U, "Add 2 and 3."), Message(A, "5")]),
    "alpaca+input": ({"instruction": "Translate.", "input": "chat", "output": "cat"},
                     [Message(U, "Translate.\n\nchat"), Message(A, "cat")]),
    "dolly": ({"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
               "category": "summarization"},
              [Message(U, "Summarise.\n\nA long text."), Message(A, "Short.")]),
    "gsm8k": ({"question": "What is 6*7?", "answer": "6*7=<<6*7=42>>42\n#### 42"},
              [Message(U, "What is 6*7?"), Message(A, "6*7=<<6*7=42>>42\n#### 42")]),
    "messages": ({"messages": [{"role": "system", "content": "Be kind."},
                               {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Bye"},
                               {"role": "assistant", "content": "Bye!"}]},
                 [Message(S, "Be kind."), Message(U, "Hi"), Message(A, "Hello!"),
                  Message(U, "Bye"), Message(A, "Bye!")]),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
                 [Message(U, "Q?"), Message(A, "A.")]),
}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("layout", ROWS)
def test_each_layout_is_detected_and_read(tmp_path, layout):
    row, expected = ROWS[layout]
    assert detect_format(row, "x") == layout.split("+")[0]
    skipped = {}
    convs = read_conversation_files([_jsonl(tmp_path / "c.jsonl", [row, row])], "auto",
                                    "data.path", skipped)
    assert convs == [expected, expected] and skipped == {}


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROWS["dolly"][0], {**ROWS["dolly"][0], "response": "Other."}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    convs = read_conversation_files([tmp_path / "d.parquet"], "auto", "data.path", {})
    assert [c[1].content for c in convs] == ["Short.", "Other."]


def test_bad_conversations_are_skipped_and_counted_never_half_read(tmp_path):
    good = ROWS["messages"][0]
    bad = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
    ]
    path = _jsonl(tmp_path / "c.jsonl", [good, *bad, good])
    skipped = {}
    convs = read_conversation_files([path], "auto", "data.path", skipped)
    assert convs == [ROWS["messages"][1]] * 2
    assert skipped["data.path"]["rows"] == 7 and skipped["data.path"]["skipped"] == 5
    assert skipped["data.path"]["first"].startswith(f"data.path={path} line 2: ")
    assert "robot" in skipped["data.path"]["first"]


def test_damaged_files_stop_with_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ROWS["gsm8k"][0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"c\.jsonl line 2 is not valid JSON"):
        read_conversation_files([path], "auto", "data.path", {})
    _jsonl(path, [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"line 1: cannot tell .*prompt, completion.*data.format"):
        read_conversation_files([path], "auto", "data.path", {})
    _jsonl(path, [{"question": "x", "answer": ""}])
    with pytest.raises(ValueError, match=r"no usable conversation .*line 1: message 1 "
                                         r"\(assistant\) has no text"):
        read_conversation_files([path], "auto", "data.path", {})


def test_oasst_tree_follows_the_best_ranked_replies(tmp_path):
    def msg(mid, parent, role, text, rank=None, deleted=False):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text,
                "rank": rank, "deleted": deleted, "lang": "en"}
    rows = [msg("r", None, "prompter", "Root?"),
            msg("a1", "r", "assistant", "worse", rank=1), msg("a0", "r", "assistant", "best", 0),
            msg("ax", "r", "assistant", "deleted", rank=None, deleted=True),
            msg("p", "a0", "prompter", "More?"), msg("b", "p", "assistant", "Sure."),
            msg("tail", "b", "prompter", "unanswered"),
            msg("r2", None, "prompter", "Alone, no answer")]
    skipped = {}
    convs = read_conversation_files([_jsonl(tmp_path / "o.jsonl", rows)], "auto", "data.path",
                                    skipped)
    assert convs == [[Message(U, "Root?"), Message(A, "best"), Message(U, "More?"),
                      Message(A, "Sure.")]]
    assert skipped["data.path"]["skipped"] == 1  # the tree with no answer


@pytest.mark.parametrize("name", ["alpaca", "dolly", "gsm8k", "oasst"])
def test_hub_presets_fail_at_once_offline(tmp_path, name):
    from h64lm.config import build_run_config
    from tests.helpers import compose_cfg

    cfg = build_run_config(compose_cfg(["stage=sft", f"data={name}", f"data.cache_dir={tmp_path}"])).data
    with pytest.raises(RuntimeError, match=r"unreachable \(HF_HUB_OFFLINE=1\).*data=arithmetic.*"
                                           r"data=chat data.path="):
        load_conversations(cfg, tmp_path)


def test_hub_loading_path_on_local_rows(tmp_path, monkeypatch):
    """The hub code path fed GSM8K-style rows: train is split by hash into train and val."""
    from datasets import Dataset

    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(40)]
    calls = []

    def fake_load_dataset(repo, config, split, cache_dir):
        calls.append((repo, config, split))
        return Dataset.from_list(rows)

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr("h64lm.data.sources._hub_offline_reason", lambda: None)
    monkeypatch.setattr("h64lm.data.sources.hub_available", lambda: True)
    cfg = DataConfig(name="gsm8k", hub_dataset="openai/gsm8k", hub_config="main", format="gsm8k",
                     val_fraction=0.1)
    train, val = load_conversations(cfg, tmp_path)
    assert calls == [("openai/gsm8k", "main", "train")]
    assert len(train) == 36 and len(val) == 4
    questions = {c[0].content for c in train} | {c[0].content for c in val}
    assert questions == {r["question"] for r in rows}
    assert load_conversations(cfg, tmp_path)[1] == val  # the same split every time


def test_arithmetic_source_and_its_files_read_the_same(tmp_path):
    train, val = load_conversations(DataConfig(name="arithmetic", max_samples=50), tmp_path)
    splits = make_splits()
    assert len(train) == 50 and len(val) == len(splits["val"])
    assert [c[0].content for c in val] == [p.question for p in splits["val"]]
    for fmt in ("gsm8k", "messages"):
        path = write_split(tmp_path / f"{fmt}.jsonl", splits["val"], fmt)
        cfg = DataConfig(name="chat", path=str(path), val_path=str(path))
        assert load_conversations(cfg, tmp_path)[0] == val


def test_pretraining_and_sft_sources_refuse_each_other(tmp_path):
    with pytest.raises(ValueError, match="data=arithmetic holds conversations"):
        load_documents(DataConfig(name="arithmetic"), tmp_path)
    with pytest.raises(ValueError, match="data=wiki_excerpt is pretraining text"):
        load_conversations(DataConfig(), tmp_path)


def test_conversations_longer_than_a_window_are_skipped_and_counted():
    chat = ChatFormat()
    short, long = ROWS["gsm8k"][1], [Message(U, "word " * 200), Message(A, "ok")]
    skipped = {}
    kept = encode_conversations(chat, [short, long, short], 64, "data=chat train", skipped)
    assert len(kept) == 2 and all(len(e.input_ids) <= 64 for e in kept)
    assert skipped["data=chat train longer than data.seq_len"]["skipped"] == 1
    with pytest.raises(ValueError, match="raise data.seq_len"):
        encode_conversations(chat, [long], 64, "data=chat train")


def test_config_refuses_what_cannot_work():
    from h64lm.validation import ConfigError

    with pytest.raises(ConfigError, match="data=chat: conversations use Mistral's v1"):
        DataConfig(name="chat", path="x.jsonl", tokenizer="/some/hf_folder")
    with pytest.raises(ConfigError, match="data.format=alpaca applies to conversation sources"):
        DataConfig(name="text", path="x.jsonl", format="alpaca")
    with pytest.raises(ConfigError, match="data.format"):
        DataConfig(name="chat", path="x.jsonl", format="csv")
