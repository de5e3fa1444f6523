"""Several examples per training window, each its own document, as `Batch`es.

An example is (input_ids [n], labels [n]) with labels already aligned (labels[t] is the target of
position t, IGNORE_INDEX where there is none), e.g. `EncodedChat.input_ids / .labels` of a
conversation. Each epoch visits the examples in a permutation seeded by (seed, epoch) and packs
them greedily in that order: an example goes into the current window of `seq_len` slots if it
fits, otherwise the window is closed and a new one starts. No example is ever cut. The unused
tail of a window is padding: `pad_id` inputs, IGNORE_INDEX labels and a document id of its own
(left out of `Batch.real_tokens`).
`document_ids` number the examples of a row 0, 1, 2, ... so the model's block-diagonal attention
(`H64LMForCausalLM.forward(document_ids=...)`) keeps each example alone, positions restarting.

Batches are cut from the epoch's windows as the token loader cuts them (h64lm/data/loader.py):
step j of an epoch takes windows [j*G, (j+1)*G), G = batch_size * world_size, rank r its slice
[r*B, (r+1)*B); the windows left over by G not dividing an epoch's count change every epoch.
The loader's position is (epoch, step), so `load_state_dict` resumes on exactly the next batch.

`with_document_ids` offers the same masking to pretraining windows cut from an EOS-separated
token stream (`data.document_mask`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.data.loader import check_loader_args

__all__ = ["Example", "PackedLoader", "pack_windows", "packed_batches", "with_document_ids"]

Example = tuple[Sequence[int], Sequence[int]]  # (input_ids [n], labels [n])


def pack_windows(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Greedy in-order packing: lists of example indexes whose lengths sum to <= seq_len."""
    windows, current, used = [], [], 0
    for i in order.tolist():
        n = int(lengths[i])
        if used + n > seq_len and current:
            windows.append(np.array(current))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        windows.append(np.array(current))
    return windows


class _Examples:
    """All examples in two flat arrays (+ offsets): compact, and hashable for resume checks."""

    def __init__(self, examples: Sequence[Example], seq_len: int, pad_id: int) -> None:
        if not examples:
            raise ValueError("no examples to pack")
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        bad = [i for i, (ids, labels) in enumerate(examples) if len(ids) != len(labels)]
        if bad:
            raise ValueError(f"example {bad[0]}: {len(examples[bad[0]][0])} input ids but "
                             f"{len(examples[bad[0]][1])} labels")
        if lengths.min() < 1 or lengths.max() > seq_len:
            worst = int(lengths.argmax() if lengths.max() > seq_len else lengths.argmin())
            raise ValueError(f"example {worst} has {lengths[worst]} tokens; every example needs "
                             f"1 to data.seq_len={seq_len} (drop or shorten it before packing)")
        self.lengths, self.seq_len, self.pad_id = lengths, seq_len, pad_id
        self.offsets = np.concatenate(([0], np.cumsum(lengths)))
        self.ids = np.fromiter((t for ids, _ in examples for t in ids), np.int64, lengths.sum())
        self.labels = np.fromiter((t for _, lab in examples for t in lab), np.int64, lengths.sum())
        digest = hashlib.sha256(lengths.tobytes())
        digest.update(self.ids.tobytes())
        digest.update(self.labels.tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def batch(self, windows: Sequence[np.ndarray]) -> Batch:
        B, T = len(windows), self.seq_len
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        docs = np.empty((B, T), dtype=np.int64)
        real = np.empty(B, dtype=np.int64)
        for row, window in enumerate(windows):
            t = 0
            for doc, i in enumerate(window.tolist()):
                a, b = self.offsets[i], self.offsets[i + 1]
                ids[row, t:t + b - a] = self.ids[a:b]
                labels[row, t:t + b - a] = self.labels[a:b]
                docs[row, t:t + b - a] = doc
                t += b - a
            docs[row, t:] = len(window)  # the padding: a document of its own
            real[row] = t
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(docs),
                     real_tokens=torch.from_numpy(real))


class PackedLoader:
    """The loader protocol over packed examples: `next_batch() -> Batch`, `state_dict()`,
    `load_state_dict()`; see the module docstring for the order."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1) -> None:
        check_loader_args(seq_len, batch_size, seed, rank, world_size, "example")
        self.data = _Examples(examples, seq_len, pad_id)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.step = 0, 0
        self._cached: tuple[int, list[np.ndarray]] | None = None
        if self.batches_in_epoch(0) == 0:
            raise ValueError(
                f"the {len(examples)} examples pack into {len(self._windows(0))} windows of "
                f"data.seq_len={seq_len}, fewer than one global batch of train.batch_size="
                f"{batch_size} x {world_size} rank(s); lower train.batch_size or add examples")

    def _windows(self, epoch: int) -> list[np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data.lengths))
            self._cached = (epoch, pack_windows(self.data.lengths, order, self.seq_len))
        return self._cached[1]

    def batches_in_epoch(self, epoch: int) -> int:
        return len(self._windows(epoch)) // self.global_batch

    def next_batch(self) -> Batch:
        while self.step >= self.batches_in_epoch(self.epoch):  # an epoch may pack differently
            self.epoch, self.step = self.epoch + 1, 0
        start = self.step * self.global_batch + self.rank * self.batch_size
        self.step += 1
        return self.data.batch(self._windows(self.epoch)[start:start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "examples": self.data.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the last batch served; the rank stays this process's own. A different
        world size is accepted when the global batch is unchanged."""
        checks = [("seq_len", self.seq_len, "data.seq_len"),
                  ("examples", self.data.fingerprint, "the fine-tuning data (data.*)")]
        for key, now, option in checks:
            if state[key] != now:
                raise ValueError(f"cannot resume the packed loader: {key} was {state[key]}, now "
                                 f"{now}; restore {option} as in the checkpoint")
        if state["batch_size"] * state["world_size"] != self.global_batch:
            raise ValueError(
                f"cannot resume the packed loader: the global batch was {state['batch_size']} x "
                f"{state['world_size']} rank(s), now {self.batch_size} x {self.world_size}; "
                "keep train.batch_size x world size as in the checkpoint")
        self.seed, self.epoch, self.step = state["seed"], state["epoch"], state["step"]
        self._cached = None


def packed_batches(examples: Sequence[Example], seq_len: int, batch_size: int,
                   pad_id: int) -> list[Batch]:
    """Every example once, in the given order (validation): the last batch may be smaller."""
    data = _Examples(examples, seq_len, pad_id)
    windows = pack_windows(data.lengths, np.arange(len(data.lengths)), seq_len)
    return [data.batch(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def with_document_ids(batch: Batch, eos_id: int) -> Batch:
    """Pretraining windows of an EOS-separated stream -> the same batch with `document_ids`: a
    new document starts after each EOS, so attention and positions restart there. Labels are
    kept (the EOS still predicts the next document's first token), so losses stay comparable
    with `data.document_mask=false`."""
    ids = batch.input_ids  # [B, T]
    after_eos = torch.zeros_like(ids)
    after_eos[:, 1:] = (ids[:, :-1] == eos_id).long()
    return Batch(ids, batch.labels, after_eos.cumsum(dim=1))
