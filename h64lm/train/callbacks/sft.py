"""Callbacks of the fine-tuning stage: exact-match accuracy on the held-out task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h64lm.eval.exact_match import arithmetic_exact_match
from h64lm.train.callbacks.base import Callback

if TYPE_CHECKING:
    from h64lm.data.chat import ChatFormat
    from h64lm.train.loop import Trainer

__all__ = ["ExactMatch"]


class ExactMatch(Callback):
    """record["sft/exact_match"]: greedy answers to the first `stage.eval_examples` test problems
    at each evaluation. Rank 0 answers, or every rank in step when the weights are sharded
    (each forward is then a collective)."""

    def __init__(self) -> None:
        self.chat: "ChatFormat | None" = None

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        s, d = trainer.run.stage, trainer.d
        # a stop request skips the work; the next step's all-reduced flag then stops every rank
        if not (d.is_main or trainer.layout.sharded) or trainer.any_stop_requested():
            return True
        if self.chat is None:
            from h64lm.data.chat import ChatFormat

            self.chat = ChatFormat()
        t = trainer.run.train
        score = arithmetic_exact_match(trainer.model, s.eval_examples, s.eval_max_new_tokens,
                                       t.val_batch_size or t.batch_size, trainer.precision.autocast, self.chat)
        record["sft/exact_match"] = score
        trainer.log(f"step {trainer.step}: exact match {score:.3f} on {s.eval_examples} held-out problems")
        return True
