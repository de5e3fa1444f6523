"""The hooks a trainer calls around its loop; a callback overrides the ones it needs.

The trainer holds a list of callbacks (composition): evaluation, sampling, downstream tasks,
routing snapshots, metrics/W&B and the status file are each one object, and a stage adds or
drops them without touching the loop. Hooks run on every rank; a callback whose work is
collective (sharded weights) acts on every rank, the rest act on rank 0 only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["Callback"]


class Callback:
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: saved in every checkpoint (this rank's
        extras, plain data and tensors), keyed by the callback's class name."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume, before on_fit_start: `state_dict()` as the checkpoint saved it."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of this launch (after any resume)."""

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        """At an evaluation step, after the validation loss is in `record` and the history holds
        it: add metrics to `record`. False = a stop signal interrupted the work (the trainer then
        saves and stops)."""
        return True

    def on_record(self, trainer: "Trainer", record: dict[str, Any], is_eval: bool) -> None:
        """After every step, with the step's full record (and evaluation results at eval steps)."""

    def on_fit_end(self, trainer: "Trainer", state: str, summary: dict[str, Any] | None) -> None:
        """Once, however the run ends: state is finished / stopped / diverged / failed; summary
        is set when it finished."""
