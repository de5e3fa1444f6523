"""What happens around the training loop, one object per concern (see `Callback`)."""

from h64lm.eval.exact_match import TASK_SOURCES
from h64lm.train.callbacks.base import Callback
from h64lm.train.callbacks.evaluation import Downstream, RoutingSnapshots, Sampling, ValidationLoss
from h64lm.train.callbacks.logging import MetricsLog, StatusFile
from h64lm.train.callbacks.sft import ExactMatch

__all__ = ["Callback", "ValidationLoss", "RoutingSnapshots", "Sampling", "Downstream", "MetricsLog",
           "StatusFile", "ExactMatch", "default_callbacks"]


def default_callbacks(run) -> list[Callback]:
    """The callbacks of a `RunConfig`, in the order they run at an evaluation step."""
    callbacks: list[Callback] = []
    if run.model.moe_layer_indices():
        # every post-training stage starts from a trained model: how far its routing moves from it
        callbacks.append(RoutingSnapshots(against_start=run.stage.name != "pretrain"))
    callbacks.append(Sampling())
    if run.train.downstream_every:
        callbacks.append(Downstream())
    if run.stage.name == "dpo" and run.stage.precompute_reference:  # before the first step: the start's log-probs
        from h64lm.train.preference_stage import PrecomputedReference

        callbacks.insert(0, PrecomputedReference())
    # data=preference_arithmetic's pairs are problems of the arithmetic task: the same test split scores them
    task = run.data.name in TASK_SOURCES or (run.stage.name == "dpo" and run.data.name == "preference_arithmetic")
    if run.stage.name in ("sft", "dpo", "rl") and run.stage.eval_examples and task:
        callbacks.append(ExactMatch())
    return callbacks + [MetricsLog(), StatusFile()]
