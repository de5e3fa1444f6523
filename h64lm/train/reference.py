"""The frozen reference policy of DPO and GRPO: the model the stage starts from, kept as it was.

It is built exactly as the trained model is (`build_model`: the same layout, so under FSDP or
expert parallelism it is sharded like the policy and each of its forwards is a collective) from
`train.init_from`, or from the same seeded initialisation when there is none, and never trained:
no gradients, no optimizer, no checkpoint. A resumed run rebuilds it from `train.init_from`
again, so the reference never drifts with the policy. It routes with its own frozen weights
(its routers and aux-free biases are those of the start).

It stays in train() mode, as the policy's forward in the step is, so that at step 0 the two give
the same log-probabilities (a training capacity factor drops the same tokens in both); it is
called under torch.no_grad().
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from h64lm.config import RunConfig
from h64lm.parallel import ParallelLayout
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import resolve_precision
from h64lm.train.init_from import initialize_from
from h64lm.train.sharded import build_model

__all__ = ["build_reference"]


def build_reference(run: RunConfig, d: Dist, log: Callable[[str], None] = lambda _: None) -> nn.Module:
    """The starting policy of `run`, frozen. Collective under several processes (as `build_model`)."""
    t = run.train
    frozen_run = dataclasses.replace(
        run, train=dataclasses.replace(t, freeze=[], trainable=[]),
        model=dataclasses.replace(run.model, gradient_checkpointing=False),
        hardware=dataclasses.replace(run.hardware, compile=False))
    init = None
    if t.init_from:
        def init(model: nn.Module) -> None:
            initialize_from(model, t.init_from, t.init_noise_std, t.seed, log)
    layout = ParallelLayout.from_run(run, d.world_size)
    precision = resolve_precision(run.hardware.precision, d.device)
    model, _, _ = build_model(frozen_run, layout, d, precision, init)
    model.requires_grad_(False)
    return model
