"""Downstream accuracy of a model during training and in `mode=eval eval.tasks=[...]`.

The local tasks (`LOCAL_TASKS`) are built from the run's own validation text, so they work offline
and never overlap the training split; any other name goes to lm-evaluation-harness's registry (the
standard tasks need the Hugging Face hub for their data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .harness import run_tasks
from .local_tasks import LOCAL_TASKS, build_local_tasks

__all__ = ["downstream_metrics", "validation_text"]

_TEXT_TOKENS = 400_000  # enough validation text for a few hundred passages per task


def validation_text(tokenizer: Any, val_tokens: np.ndarray) -> str:
    return tokenizer.decode(np.asarray(val_tokens[:_TEXT_TOKENS]).tolist())


def downstream_metrics(model, tokenizer, tasks: list[str], val_tokens: np.ndarray, work_dir: Path,
                       device: str, batch_size: int, limit: Optional[int] = None,
                       num_fewshot: Optional[int] = None, local_examples: int = 200) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (metric names without lm-eval's ",none" filter suffix); the harness's
    full results JSON is written to `work_dir/results.json`."""
    include_path = None
    if any(t in LOCAL_TASKS for t in tasks):
        built = build_local_tasks(validation_text(tokenizer, val_tokens), Path(work_dir) / "tasks",
                                  n=local_examples)
        include_path = built["include_path"]
    only_local = all(t in LOCAL_TASKS for t in tasks)
    was_training = model.training
    try:
        results = run_tasks(model, tokenizer, tasks, device=device, batch_size=batch_size, limit=limit,
                            out_dir=work_dir, include_path=include_path, num_fewshot=num_fewshot,
                            include_defaults=not only_local)
    finally:
        model.train(was_training)
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not k.endswith("_stderr,none") and "," in k}
            for task, metrics in results["results"].items()}
