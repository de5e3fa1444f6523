"""From a DataConfig to packed batches: a local chat file read, encoded and packed."""

from __future__ import annotations

import json

from h64lm.data.batch import IGNORE_INDEX
from h64lm.data.chat import ChatFormat, Message
from h64lm.data.config import DataConfig
from h64lm.data.sft import build_sft_data


def test_a_chat_file_becomes_batches_with_assistant_targets_only(tmp_path):
    rows = [{"instruction": f"Say {w}.", "output": w} for w in
            ["yes", "no", "maybe", "later", "now", "never", "always", "soon"]]
    rows.append({"instruction": "broken", "output": ""})  # skipped, counted
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(name="chat", path=str(path), val_fraction=0.25, seq_len=64,
                     cache_dir=str(tmp_path))
    loader, val, skipped = build_sft_data(cfg, batch_size=2, seed=0)
    assert skipped["data.path"]["skipped"] == 1 and "line 9" in skipped["data.path"]["first"]
    chat = ChatFormat()
    batch = loader.next_batch()
    targets = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    # every target is an answer token or </s>; each packed answer ends with one </s>
    answers = {t for r in rows[:8] for t in chat.encode([Message("user", r["instruction"]),
                                                         Message("assistant", r["output"])]
                                                        ).labels if t != IGNORE_INDEX}
    conversations = sum(len(set(docs[labels != IGNORE_INDEX].tolist()))
                        for docs, labels in zip(batch.document_ids, batch.labels))
    assert set(targets) <= answers and targets.count(chat.eos_id) == conversations >= 2
    assert sum(b.num_targets() for b in val) > 0
