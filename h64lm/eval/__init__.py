"""Evaluation with lm-evaluation-harness: our model as an lm-eval LM, local offline tasks."""

from .downstream import downstream_metrics
from .harness import H64LMEvalLM, run_tasks
from .local_tasks import LOCAL_TASKS, build_local_tasks

__all__ = ["downstream_metrics", "H64LMEvalLM", "LOCAL_TASKS", "build_local_tasks", "run_tasks"]
