"""Packing: every example whole and once per epoch, its own document; exact resume; sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.data.chat import ChatFormat, Message
from h64lm.data.packing import PackedLoader, packed_batches, with_document_ids
from h64lm.model import H64LMConfig, H64LMForCausalLM

PAD = 0


def _examples(n=40, seed=0, max_len=12):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        ids = [1000 * (i + 1) + t for t in range(length)]  # unique: names the example and slot
        labels = [t + 1 if t % 3 else IGNORE_INDEX for t in ids]
        out.append((ids, labels))
    return out


def _segments(batch: Batch, pad: int = PAD):
    """-> list of (input_ids, labels) per document of each row, padding excluded."""
    out = []
    for ids, labels, docs in zip(batch.input_ids, batch.labels, batch.document_ids):
        for d in docs.unique().tolist():
            sel = docs == d
            seg_ids, seg_labels = ids[sel].tolist(), labels[sel].tolist()
            assert sel.nonzero().flatten().diff().eq(1).all()  # a document is contiguous
            if all(t == pad for t in seg_ids):
                assert all(lab == IGNORE_INDEX for lab in seg_labels)
                assert d == docs.max()  # padding: the last document of the row
                continue
            out.append((seg_ids, seg_labels))
    return out


def test_each_example_whole_once_per_epoch_and_alone_in_its_document():
    examples = _examples()
    loader = PackedLoader(examples, seq_len=16, batch_size=2, seed=3, pad_id=PAD)
    per_epoch = loader.batches_in_epoch(0)
    seen = []
    for _ in range(per_epoch):
        batch = loader.next_batch()
        assert batch.input_ids.shape == batch.labels.shape == batch.document_ids.shape == (2, 16)
        segments = _segments(batch)
        assert batch.num_inputs() == sum(len(ids) for ids, _ in segments)  # the padding tail left out
        seen += segments
    as_tuples = [(tuple(a), tuple(b)) for a, b in seen]
    assert len(set(as_tuples)) == len(as_tuples)  # none twice
    assert set(as_tuples) <= {(tuple(a), tuple(b)) for a, b in examples}  # each one whole
    # what is left out of an epoch fits in less than one global batch of windows
    left = sum(len(a) for a, _ in examples) - sum(len(a) for a, _ in seen)
    assert left <= 2 * 16


def test_order_is_seeded_and_changes_every_epoch():
    def first_rows(seed, n):
        loader = PackedLoader(_examples(), 16, 2, seed, PAD)
        return [loader.next_batch().input_ids for _ in range(n)]

    a, b = first_rows(3, 6), first_rows(3, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first_rows(4, 1)[0], a[0])
    loader = PackedLoader(_examples(), 16, 2, 3, PAD)
    epoch0 = [loader.next_batch().input_ids for _ in range(loader.batches_in_epoch(0))]
    assert loader.epoch == 0
    epoch1 = loader.next_batch().input_ids
    assert loader.epoch == 1 and not torch.equal(epoch1, epoch0[0])


def test_resume_gives_exactly_the_next_batches_across_epochs():
    examples = _examples()
    ref = PackedLoader(examples, 16, 2, 7, PAD)
    steps = ref.batches_in_epoch(0) - 1  # resume one batch before the epoch ends
    for _ in range(steps):
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(4)]
    resumed = PackedLoader(examples, 16, 2, 0, PAD)  # another seed: the state restores it
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(getattr(got, k), getattr(want, k))
                   for k in ("input_ids", "labels", "document_ids"))


def test_resume_refuses_other_data_or_global_batch():
    state = PackedLoader(_examples(), 16, 2, 7, PAD).state_dict()
    with pytest.raises(ValueError, match="examples was"):
        PackedLoader(_examples(seed=1), 16, 2, 7, PAD).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        PackedLoader(_examples(), 16, 3, 7, PAD).load_state_dict(state)
    # the same global batch on 2 ranks resumes
    PackedLoader(_examples(), 16, 1, 7, PAD, rank=1, world_size=2).load_state_dict(state)


def test_ranks_split_the_single_process_batch():
    examples = _examples()
    whole = PackedLoader(examples, 16, 4, 5, PAD)
    ranks = [PackedLoader(examples, 16, 2, 5, PAD, rank=r, world_size=2) for r in range(2)]
    for _ in range(whole.batches_in_epoch(0) + 2):
        joined = torch.cat([r.next_batch().input_ids for r in ranks])
        assert torch.equal(joined, whole.next_batch().input_ids)


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(ValueError, match="has 20 tokens.*data.seq_len=16"):
        PackedLoader([([1] * 20, [1] * 20)] + _examples(), 16, 2, 0, PAD)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(_examples(n=3), 16, 8, 0, PAD)
    with pytest.raises(ValueError, match="labels"):
        PackedLoader([([1, 2], [1])], 16, 1, 0, PAD)


def test_validation_batches_hold_every_example_in_order():
    examples = _examples(n=23)
    batches = packed_batches(examples, 16, 3, PAD)
    seen = [seg for b in batches for seg in _segments(b)]
    assert seen == [(list(a), list(b)) for a, b in examples]


def test_with_document_ids_starts_a_document_after_each_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 1, 7, eos, 1, 8], [eos, 1, 9, 9, 9, 9, eos, 1]])
    labels = torch.roll(ids, -1, dims=1)
    out = with_document_ids(Batch(ids, labels), eos)
    assert out.document_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]]
    assert torch.equal(out.labels, labels) and torch.equal(out.input_ids, ids)


def test_packed_conversations_train_as_if_alone():
    """Real conversations through the chat format and the packer into a tiny model: the loss of
    every target equals the one of its conversation run alone."""
    chat = ChatFormat()
    convs = [[Message("user", f"What is {a}+{b}?"), Message("assistant", f"#### {a + b}")]
             for a, b in [(2, 3), (10, 7), (1, 1), (4, 9), (6, 6), (3, 8)]]
    encoded = [chat.encode(c) for c in convs]
    examples = [(e.input_ids, e.labels) for e in encoded]
    torch.manual_seed(0)
    model = H64LMForCausalLM(H64LMConfig(vocab_size=32000, hidden_size=32, num_layers=2,
                                         num_attention_heads=4, num_kv_heads=2,
                                         intermediate_size=64, moe_intermediate_size=32,
                                         num_experts=4, max_position_embeddings=64)).eval()
    batch = PackedLoader(examples, 48, 2, 0, chat.eos_id).next_batch()
    assert int(batch.document_ids.max(dim=1).values.min()) >= 1  # several per row
    logits = model(batch.input_ids, document_ids=batch.document_ids).logits
    packed = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX).view_as(batch.labels)
    checked = 0
    for row in range(batch.input_ids.shape[0]):
        docs = batch.document_ids[row]
        for d in docs.unique().tolist():
            sel = (docs == d).nonzero().flatten()  # [n] slots of this document
            ids = batch.input_ids[row, sel].tolist()
            if ids not in [list(a) for a, _ in examples]:
                continue  # the padding
            labels = torch.tensor(examples[[list(a) for a, _ in examples].index(ids)][1])
            alone = F.cross_entropy(model(torch.tensor([ids])).logits[0], labels,
                                    reduction="none", ignore_index=IGNORE_INDEX)
            assert torch.equal(batch.labels[row, sel], labels)
            assert torch.allclose(packed[row, sel], alone, atol=1e-5)
            checked += 1
    assert checked == len(_segments(batch, chat.eos_id)) >= 3
