"""What a training stage brings to the trainer: its data and its objective.

Pretraining is one stage: windows of the token stream and next-token language modelling. SFT or
preference stages bring another loader (any `h64lm.data.protocol.Loader`) and objective
(`h64lm.objectives`); the trainer's loop and step are the same for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from h64lm.config import RunConfig
from h64lm.data import Loader, Tokenizer, TokenLoader, prepare_corpus
from h64lm.objectives import LanguageModelling, Objective
from h64lm.runtime.distributed import Dist

__all__ = ["Stage", "StageFactory", "pretraining_stage"]


@dataclass
class Stage:
    loader: Loader  # this rank's training micro-batches, resumable
    objective: Objective
    val_tokens: np.ndarray  # the validation token stream (validation loss, downstream tasks)


StageFactory = Callable[[RunConfig, Dist, Tokenizer], Stage]


def pretraining_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """The corpus of `data.*` cut into windows (`TokenLoader`), next-token prediction."""
    t = run.train
    corpus = prepare_corpus(run.data, tokenizer)
    loader = TokenLoader(corpus.train, run.data.seq_len, t.batch_size, t.seed, d.rank, d.world_size)
    return Stage(loader, LanguageModelling(run.model), corpus.val)
