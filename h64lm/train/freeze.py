"""Which parameters a run trains: `train.freeze` and `train.trainable`, regular expressions
searched in parameter names (`layers.1.ffn.router.weight`, `layers.1.ffn.experts.down_proj`).

    train.freeze=[router]       every parameter but the routers trains
    train.trainable=[experts]   only the experts train (everything else frozen)

Both may be given: trainable first selects, freeze then removes. Frozen parameters get
`requires_grad=False` when the model is built, before any parallel wrapper or optimizer, so DDP
reduces no gradient for them, FSDP/EP shards carry the flag, and neither the AdamW nor the Muon
groups hold them (their weight decay never touches them either).
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from h64lm.validation import ConfigError

__all__ = ["frozen_names", "freeze_parameters"]


def frozen_names(names: Sequence[str], freeze: Sequence[str], trainable: Sequence[str]) -> list[str]:
    """The names that `freeze` / `trainable` leave untrained; a pattern matching no name, or a
    selection that trains nothing, is refused (a typo must not silently train everything)."""
    for key, patterns in (("train.freeze", freeze), ("train.trainable", trainable)):
        for p in patterns:
            if not any(re.search(p, n) for n in names):
                raise ConfigError(f"{key}: {p!r} matches no parameter name (they look like "
                                  f"{', '.join(names[-4:])}); fix the pattern")
    selected = [n for n in names if not trainable or any(re.search(p, n) for p in trainable)]
    trained = {n for n in selected if not any(re.search(p, n) for p in freeze)}
    if not trained:
        raise ConfigError(f"train.freeze={list(freeze)} with train.trainable={list(trainable)} leaves "
                          "no parameter to train; narrow the patterns")
    return [n for n in names if n not in trained]


def freeze_parameters(model: nn.Module, freeze: Sequence[str], trainable: Sequence[str]) -> list[str]:
    """requires_grad=False on the parameters `frozen_names` picks; -> their names."""
    if not freeze and not trainable:
        return []
    params = dict(model.named_parameters())
    frozen = frozen_names(list(params), freeze, trainable)
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
