"""Preference pairs as training batches: two right-padded rows per pair, resumable by rank.

    loader, val_batches, skipped = build_preference_data(cfg, batch_size, seed, rank, world_size)

A pair (prompt, chosen, rejected) becomes two conversations in Mistral's v1 chat format
(`ChatFormat`): prompt + chosen answer in row 2i, prompt + rejected answer in row 2i + 1 of a
micro-batch of `batch_size` pairs. A row holds the WHOLE encoded conversation, the closing `</s>`
included, because a sequence's score is read at its last real token (`extras["last"]`, the
`</s>`; Hugging Face's *ForSequenceClassification reads the same position). Labels are the
next-token targets of the answer's tokens (labels[t] = tokens[t + 1] where tokens[t + 1] is the
assistant's, `</s>` included; -100 elsewhere), so the sum of `token_logprobs` over a row is
log pi(answer | prompt).

Padding, not packing: every row is padded to one width W, the longest conversation of the train
and validation pairs (<= data.seq_len), with PAD_ID (Mistral's `<unk>`, never the last real token,
so an exported classifier finds the `</s>`). Causal attention keeps the padding out of every real
token's output; the fixed W keeps each layout's shapes (and MoE capacity) identical.

`extras`: "pair" [2P] the pair's index in its split (train or validation; both rows share it, the
key of precomputed reference log-probs), "last" [2P] the position of each row's `</s>`.

Order (as `PackedLoader`'s): epoch e visits the train pairs in a permutation seeded by
(seed, e); step j takes pairs [j G, (j + 1) G), G = batch_size x world_size, rank r its slice
[r B, (r + 1) B); the pairs left over by G not dividing the count change every epoch. Every
micro-batch holds exactly B pairs, so a step's pair count is B x micro-batches x ranks.
Validation: every held-out pair once, in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.data.chat import ChatFormat, Message
from h64lm.data.config import DataConfig, resolve_cache_dir
from h64lm.data.loader import check_loader_args
from h64lm.data.preference import PreferencePair, load_pairs

__all__ = ["EncodedPairs", "PAD_ID", "PreferenceLoader", "build_preference_data", "encode_pairs",
           "preference_batches"]

PAD_ID = 0  # Mistral's <unk>: Mistral has no pad token, and EOS would hide each row's last real token


@dataclass(frozen=True)
class EncodedPairs:
    """Rows of one split: row 2i = pair i's chosen conversation, row 2i + 1 its rejected one."""

    tokens: list[list[int]]  # [2N] whole conversations, </s> included
    labels: list[list[int]]  # [2N] aligned next-token targets on the answer's tokens

    def __len__(self) -> int:
        return len(self.tokens) // 2

    def width(self) -> int:
        return max(len(t) for t in self.tokens)


def _row(chat: ChatFormat, messages: list[dict]) -> tuple[list[int], list[int]]:
    encoded = chat.encode([Message(m["role"], m["content"]) for m in messages])
    tokens = encoded.tokens
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(tokens[1:], encoded.trained[1:])]
    return tokens, labels + [IGNORE_INDEX]  # the </s> predicts nothing


def encode_pairs(chat: ChatFormat, pairs: Sequence[PreferencePair], seq_len: int, key: str,
                 skipped: dict) -> EncodedPairs:
    """The pairs whose two conversations both fit in `seq_len` tokens and are well-formed chats;
    the others are counted in skipped[key] = {"pairs", "reasons", "first"} (first: the pair's
    index in `pairs`)."""
    tokens: list[list[int]] = []
    labels: list[list[int]] = []
    reasons: dict[str, int] = {}
    first = None
    for i, pair in enumerate(pairs):
        try:
            rows = [_row(chat, pair.conversation(which)) for which in ("chosen", "rejected")]
        except ValueError:  # turns in an order the chat format refuses (two user turns in a row)
            reason = "bad_turns"
        else:
            reason = "too_long" if max(len(r[0]) for r in rows) > seq_len else None
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
            first = i if first is None else first
            continue
        for t, lab in rows:
            tokens.append(t)
            labels.append(lab)
    if reasons:
        skipped[key] = {"pairs": len(pairs), "reasons": reasons, "first": first}
    if not tokens:
        raise ValueError(f"{key}: none of the {len(pairs)} preference pairs is usable ({reasons}); "
                         f"raise data.seq_len={seq_len} or check the data")
    return EncodedPairs(tokens, labels)


def preference_batches(rows: EncodedPairs, pairs: Sequence[int], width: int) -> Batch:
    """The micro-batch of pair indexes `pairs`: [2P, width] rows, chosen first in each pair."""
    P = len(pairs)
    ids = np.full((2 * P, width), PAD_ID, dtype=np.int64)
    labels = np.full((2 * P, width), IGNORE_INDEX, dtype=np.int64)
    last = np.empty(2 * P, dtype=np.int64)
    for k, i in enumerate(pairs):
        for side in (0, 1):
            t, lab = rows.tokens[2 * i + side], rows.labels[2 * i + side]
            ids[2 * k + side, :len(t)] = t
            labels[2 * k + side, :len(t)] = lab
            last[2 * k + side] = len(t) - 1
    index = torch.tensor(pairs, dtype=torch.long).repeat_interleave(2)  # [2P]
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels),
                 extras={"pair": index, "last": torch.from_numpy(last)}, real_tokens=torch.from_numpy(last + 1))


def _fingerprint(rows: EncodedPairs, width: int) -> str:
    digest = hashlib.sha256(str(width).encode())
    for t, lab in zip(rows.tokens, rows.labels):
        digest.update(np.asarray(t, dtype=np.int64).tobytes())
        digest.update(np.asarray(lab, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


class PreferenceLoader:
    """The loader protocol over the train pairs; see the module docstring for the order."""

    def __init__(self, rows: EncodedPairs, width: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        check_loader_args(width, batch_size, seed, rank, world_size, "pair")
        self.rows, self.width = rows, width
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if len(rows) < self.global_batch:
            raise ValueError(f"{len(rows)} training pairs are fewer than one global batch of "
                             f"train.batch_size={batch_size} pairs x {world_size} rank(s); lower "
                             "train.batch_size or add pairs")
        self.fingerprint = _fingerprint(rows, width)
        self.epoch, self.step = 0, 0

    def batches_in_epoch(self) -> int:
        return len(self.rows) // self.global_batch

    def next_batch(self) -> Batch:
        if self.step >= self.batches_in_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        start = self.step * self.global_batch + self.rank * self.batch_size
        self.step += 1
        return preference_batches(self.rows, order[start:start + self.batch_size].tolist(), self.width)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "pairs": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the last batch served; the rank stays this process's own. Another world
        size is accepted when the global batch is unchanged."""
        if state["pairs"] != self.fingerprint:
            raise ValueError("cannot resume the preference loader: the encoded pairs differ from the "
                             "checkpoint's; restore data.* (source, max_samples, seq_len) as it was")
        if state["batch_size"] * state["world_size"] != self.global_batch:
            raise ValueError(
                f"cannot resume the preference loader: the global batch was {state['batch_size']} x "
                f"{state['world_size']} rank(s) pairs, now {self.batch_size} x {self.world_size}; keep "
                "train.batch_size x world size as in the checkpoint")
        self.seed, self.epoch, self.step = state["seed"], state["epoch"], state["step"]


def build_preference_data(cfg: DataConfig, batch_size: int, val_batch_size: int, seed: int, rank: int = 0,
                          world_size: int = 1) -> tuple[PreferenceLoader, list[Batch], dict]:
    """-> (train loader, every validation pair once in batches of `val_batch_size` pairs, skipped:
    {config key: {pairs or rows, reasons, first}} of the rows and pairs left out). `seed`
    (train.seed) also draws the generated pairs of data=preference_arithmetic."""
    loaded = load_pairs(cfg, resolve_cache_dir(cfg) / "hf_datasets", seed)
    skipped = dict(loaded.skipped)
    chat = ChatFormat()
    train = encode_pairs(chat, loaded.train, cfg.seq_len, f"data={cfg.name} train", skipped)
    val = encode_pairs(chat, loaded.val, cfg.seq_len, f"data={cfg.name} val", skipped)
    width = max(train.width(), val.width())
    loader = PreferenceLoader(train, width, batch_size, seed, rank, world_size)
    val_batches = [preference_batches(val, list(range(i, min(i + val_batch_size, len(val)))), width)
                   for i in range(0, len(val), val_batch_size)]
    return loader, val_batches, skipped
