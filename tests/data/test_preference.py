"""Preference pairs: every row shape, bad rows, splits, the offline generator and the hub presets."""

import json
import re

import pytest

from h64lm.data.config import DataConfig
from h64lm.data.preference import (
    PreferencePair,
    arithmetic_pairs,
    load_pairs,
    pair_from_row,
    parse_hh,
    read_pair_files,
    split_pairs,
)
from h64lm.data.sources import load_documents
from h64lm.objectives.rewards import exact_match_reward


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def test_string_rows():
    pair = pair_from_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert pair == PreferencePair((_user("2+2?"),), "4", "5")
    assert pair.conversation("rejected") == [_user("2+2?"), _assistant("5")]


def test_ultrafeedback_conversations():
    row = {"prompt": "Name a prime.",
           "chosen": [_user("Name a prime."), _assistant("7")],
           "rejected": [_user("Name a prime."), _assistant("8")],
           "score_chosen": 9.0, "score_rejected": 2.0}
    assert pair_from_row(row) == PreferencePair((_user("Name a prime."),), "7", "8")
    system = {"role": "system", "content": "Answer with a number."}
    row = {**row, "chosen": [system, *row["chosen"]], "rejected": [system, *row["rejected"]]}
    assert pair_from_row(row).prompt == (system, _user("Name a prime."))


def test_trl_conversational_prompt_with_answer_turns():
    row = {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")],
           "chosen": [_assistant("Hello.")], "rejected": [_assistant("Go away.")]}
    pair = pair_from_row(row)
    assert pair.prompt == ({"role": "system", "content": "Be brief."}, _user("Hi"))
    assert (pair.chosen, pair.rejected) == ("Hello.", "Go away.")


def test_hh_rlhf_transcripts_become_turns():
    text = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant: 12"
    assert parse_hh(text) == [_user("What is 2+2?"), _assistant("4."), _user("And times 3?"),
                              _assistant("12")]
    pair = pair_from_row({"chosen": text, "rejected": text[:-2] + "13"})
    assert pair.prompt == (_user("What is 2+2?"), _assistant("4."), _user("And times 3?"))
    assert (pair.chosen, pair.rejected) == ("12", "13")


BAD_ROWS = {
    "identical": {"prompt": "q", "chosen": "same", "rejected": " same "},
    "empty_answer": {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: "},
    "prompt_mismatch": {"chosen": [_user("q1"), _assistant("a")], "rejected": [_user("q2"), _assistant("b")]},
    "not_assistant": {"chosen": [_user("q"), _assistant("a"), _user("more?")],
                      "rejected": [_user("q"), _assistant("b")]},
    "no_prompt": {"chosen": "a", "rejected": "b"},
    "unparseable": {"chosen": "preamble\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_half_parsed_pairs_are_skipped_and_counted(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    mismatched_prompt = {"prompt": "other question", "chosen": [_user("q"), _assistant("a")],
                         "rejected": [_user("q"), _assistant("b")]}
    rows = [good, *BAD_ROWS.values(), mismatched_prompt, good]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    skipped = {}
    pairs = read_pair_files(str(path), "data.path", skipped)
    assert pairs == [PreferencePair((_user("q"),), "a", "b")] * 2
    report = skipped["data.path"]
    assert report["rows"] == len(rows)
    assert report["reasons"] == {reason: 1 + (reason == "prompt_mismatch") for reason in BAD_ROWS}
    assert report["first"] == f"{path} line 2"


@pytest.mark.parametrize("line,match", [
    ("{not json", r"line 2 is not valid JSON"),
    ("[1, 2]", r"line 2 is a JSON list"),
    (json.dumps({"prompt": "q", "chosen": 4, "rejected": "b"}), r"line 2: chosen is a int"),
    (json.dumps({"prompt": "q", "chosen": [{"role": "bot", "content": "x"}], "rejected": "b"}),
     r"line 2: chosen\[0\] is not a message"),
])
def test_malformed_rows_stop_naming_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        read_pair_files(str(path), "data.path", {})
    assert str(path) in str(err.value)


def test_a_file_without_any_usable_pair_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [BAD_ROWS["identical"]] * 3)
    with pytest.raises(ValueError, match=r"no usable preference pair; all 3 rows skipped, most "
                                         r"for: chosen == rejected"):
        read_pair_files(str(path), "data.path", {})


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": "q", "chosen": "c", "rejected": "c"}]),
                   tmp_path / "pairs.parquet")
    skipped = {}
    assert read_pair_files(str(tmp_path), "data.path", skipped) == [
        PreferencePair((_user("q"),), "a", "b")]
    assert skipped["data.path"]["first"].endswith("pairs.parquet row 2")


def test_split_keeps_prompts_whole_and_is_deterministic():
    pairs = [PreferencePair((_user(f"q{i % 25}"),), f"a{i}", f"b{i}") for i in range(100)]
    train, val = split_pairs(pairs, 0.2)

    def prompts(side):
        return {p.prompt[0]["content"] for p in side}

    assert len(train) + len(val) == 100 and 20 <= len(val) <= 24  # whole groups of 4
    assert not prompts(train) & prompts(val)
    assert prompts(split_pairs(list(reversed(pairs)), 0.2)[1]) == prompts(val)  # order-free


def test_arithmetic_pairs_are_right_versus_wrong():
    pairs = arithmetic_pairs(50, seed=3)
    assert pairs == arithmetic_pairs(50, seed=3) and pairs != arithmetic_pairs(50, seed=4)
    for pair in pairs:
        a, b, c = map(int, re.findall(r"\d+", pair.prompt[0]["content"]))
        truth = str(a + b - c)
        assert exact_match_reward(pair.chosen, truth) == 1.0
        assert exact_match_reward(pair.rejected, truth) == 0.0
        # the rejected answer is the same work up to the wrong result
        assert pair.rejected.split("\n")[0] == pair.chosen.split("\n")[0]


def test_load_pairs_local_and_generated(tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    val_file = _write_jsonl(tmp_path / "val.jsonl", [{"prompt": "v", "chosen": "c", "rejected": "d"}])
    cfg = DataConfig(name="preference", path=str(train_file), val_path=str(val_file))
    loaded = load_pairs(cfg, tmp_path)
    assert [p.chosen for p in loaded.train] == ["a"] and [p.chosen for p in loaded.val] == ["c"]
    generated = load_pairs(DataConfig(name="preference_arithmetic", max_samples=40), tmp_path)
    assert len(generated.train) + len(generated.val) == 40 and generated.val


def test_hub_presets_fail_offline_naming_the_local_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DataConfig(name="ultrafeedback", hub_dataset="HuggingFaceH4/ultrafeedback_binarized")
    with pytest.raises(RuntimeError, match="data=preference_arithmetic"):
        load_pairs(cfg, tmp_path / "hf")


def test_preference_sources_are_refused_as_pretraining_documents(tmp_path):
    with pytest.raises(ValueError, match="preference pairs for a reward-model or DPO stage"):
        load_documents(DataConfig(name="preference_arithmetic"), tmp_path)


def test_local_preference_source_needs_a_path():
    with pytest.raises(Exception, match="data.name=preference needs data.path"):
        DataConfig(name="preference")
