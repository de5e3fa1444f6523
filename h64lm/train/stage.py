"""What a training stage brings to the trainer: its data and its objective.

Pretraining is one stage: windows of the token stream and next-token language modelling. SFT or
preference stages bring another loader (any `h64lm.data.protocol.Loader`) and objective
(`h64lm.objectives`); the trainer's loop and step are the same for all of them. `stage.name`
picks the factory (`stage_factory`).

Validation follows the data: pretraining validates on fixed windows of the held-out token stream
(`val_tokens`), SFT on every held-out conversation once, packed into fixed batches
(`val_batches`, prompt tokens masked as in training; the first `data.val_windows` windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from h64lm.config import RunConfig
from h64lm.data import Loader, Tokenizer, TokenLoader, prepare_corpus
from h64lm.data.batch import Batch
from h64lm.data.config import DataConfig
from h64lm.data.packing import with_document_ids
from h64lm.objectives import LanguageModelling, Objective
from h64lm.runtime.distributed import Dist

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["DocumentMasked", "Stage", "StageFactory", "pretraining_stage", "sft_stage", "sft_validation_batches",
           "stage_factory"]


@dataclass
class Stage:
    loader: Loader  # this rank's training micro-batches, resumable
    objective: Objective
    # the validation token stream (validation windows, routing snapshots, downstream tasks);
    # None when the stage validates on `val_batches`
    val_tokens: Optional[np.ndarray]
    val_batches: Optional[list[Batch]] = None  # every validation example once, the same on every rank
    # A stage's own validation (preference accuracy, rewards of sampled answers): trainer ->
    # {"val_loss": ..., other metrics by name} (val_loss decides best/ and the history), or None
    # when a stop request interrupted it. None: the language-modelling loss of val_batches/val_tokens.
    validate: Optional[Callable[["Trainer"], Optional[dict[str, Any]]]] = None


StageFactory = Callable[[RunConfig, Dist, Tokenizer], Stage]


def pretraining_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """The corpus of `data.*` cut into windows (`TokenLoader`), next-token prediction."""
    t = run.train
    corpus = prepare_corpus(run.data, tokenizer)
    loader: Loader = TokenLoader(corpus.train, run.data.seq_len, t.batch_size, t.seed, d.rank, d.world_size)
    if run.data.document_mask:
        loader = DocumentMasked(loader, tokenizer.eos_id)
    return Stage(loader, LanguageModelling(run.model), corpus.val)


class DocumentMasked:
    """`data.document_mask`: the pretraining windows with `document_ids`, so attention and
    positions restart after each EOS of the corpus stream (`with_document_ids`). The loader's
    state is its inner loader's: a run resumes exactly, with or without the switch. Validation
    keeps plain windows, so the two settings are measured alike."""

    def __init__(self, loader: Loader, eos_id: int):
        self.loader, self.eos_id = loader, eos_id

    def next_batch(self) -> Batch:
        return with_document_ids(self.loader.next_batch(), self.eos_id)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def sft_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """Conversations of `data.*` packed into windows (`PackedLoader`); the language-modelling
    objective sees labels only on assistant tokens, so the loss is theirs alone, normalised by
    the step's global count of them (`StepShare`)."""
    from h64lm.data.sft import build_sft_data

    t = run.train
    loader, val_batches, skipped = build_sft_data(run.data, t.batch_size, t.seed, d.rank, d.world_size)
    left_out = {k: v for k, v in skipped.items() if v.get("skipped")}
    if left_out and d.is_main:
        print(f"data={run.data.name}: left out {left_out}", flush=True)
    val_batches = _rebatch(val_batches, t.val_batch_size or t.batch_size, run.data.val_windows)
    return Stage(loader, LanguageModelling(run.model), None, val_batches)


def _rebatch(batches: list[Batch], size: int, limit: int | None) -> list[Batch]:
    """The first `limit` rows (packed windows; None: all), in order, `size` per batch (the last
    may be smaller): `data.val_windows` bounds an evaluation's cost as in pretraining."""
    rows = [torch.cat([getattr(b, f) for b in batches])[:limit] for f in ("input_ids", "labels", "document_ids")]
    return [Batch(*(r[i:i + size] for r in rows)) for i in range(0, len(rows[0]), size)]


def sft_validation_batches(data: DataConfig, batch_size: int) -> list[Batch]:
    """The validation batches `sft_stage` builds, without encoding the training conversations
    (mode=eval of a fine-tuned checkpoint)."""
    from h64lm.data.chat import ChatFormat
    from h64lm.data.config import resolve_cache_dir
    from h64lm.data.packing import packed_batches
    from h64lm.data.sft_sources import encode_conversations, load_conversations

    chat = ChatFormat()
    _, val = load_conversations(data, resolve_cache_dir(data) / "hf_datasets")
    encoded = encode_conversations(chat, val, data.seq_len, f"data={data.name} val")
    batches = packed_batches([(e.input_ids, e.labels) for e in encoded], data.seq_len, batch_size, chat.eos_id)
    return _rebatch(batches, batch_size, data.val_windows)


def _preference_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """stage=reward | dpo (h64lm/train/preference_stage.py, which imports `Stage` from here)."""
    from h64lm.train import preference_stage

    return getattr(preference_stage, f"{run.stage.name}_stage")(run, d, tokenizer)


def rl_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """GRPO / PPO on sampled answers to the data's prompts (h64lm/train/rl_stage.py)."""
    from h64lm.train.rl_stage import rl_stage as build

    return build(run, d, tokenizer)


_FACTORIES: dict[str, StageFactory] = {"pretrain": pretraining_stage, "sft": sft_stage,
                                       "reward": _preference_stage, "dpo": _preference_stage, "rl": rl_stage}


def stage_factory(run: RunConfig) -> StageFactory:
    """The factory of `stage.name`."""
    return _FACTORIES[run.stage.name]
