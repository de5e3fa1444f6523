"""Callbacks of the fine-tuning stage: exact-match accuracy on the held-out task."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from h64lm.eval.exact_match import arithmetic_exact_match
from h64lm.train.callbacks.base import Callback

if TYPE_CHECKING:
    from h64lm.data.chat import ChatFormat
    from h64lm.train.loop import Trainer

__all__ = ["ExactMatch"]


class ExactMatch(Callback):
    """record["sft/exact_match"]: greedy answers to the first `stage.eval_examples` test problems
    at each evaluation, and once before the first step (the starting model). Every score also
    goes to RUN/exact_match.json ({step: accuracy}, step 0 = before fine-tuning), the before /
    after table of the run. Rank 0 answers, or every rank in step when the weights are sharded
    (each forward is then a collective)."""

    def __init__(self) -> None:
        self.chat: "ChatFormat | None" = None

    def _score(self, trainer: "Trainer") -> float:
        if self.chat is None:
            from h64lm.data.chat import ChatFormat

            self.chat = ChatFormat()
        s, t = trainer.run.stage, trainer.run.train
        score = arithmetic_exact_match(trainer.model, s.eval_examples, s.eval_max_new_tokens,
                                       t.val_batch_size or t.batch_size, trainer.precision.autocast, self.chat)
        trainer.log(f"step {trainer.step}: exact match {score:.3f} on {s.eval_examples} held-out problems")
        if trainer.d.is_main:
            path = trainer.run_dir / "exact_match.json"
            scores = json.loads(path.read_text()) if path.is_file() else {}
            scores[str(trainer.step)] = score
            path.write_text(json.dumps(scores, indent=1))
        return score

    def _answers(self, trainer: "Trainer") -> bool:
        return trainer.d.is_main or trainer.layout.sharded

    def on_fit_start(self, trainer: "Trainer") -> None:
        if trainer.step == 0 and self._answers(trainer):
            self._score(trainer)

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        # a stop request skips the work; the next step's all-reduced flag then stops every rank
        if self._answers(trainer) and not trainer.any_stop_requested():
            record["sft/exact_match"] = self._score(trainer)
        return True
