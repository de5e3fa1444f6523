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
        callbacks.append(RoutingSnapshots(against_start=run.stage.name != "pretrain"))
    callbacks.append(Sampling())
    if run.train.downstream_every:
        callbacks.append(Downstream())
    if run.stage.name in ("sft", "rl") and run.stage.eval_examples and run.data.name in TASK_SOURCES:
        callbacks.append(ExactMatch())
    return callbacks + [MetricsLog(), StatusFile()]
