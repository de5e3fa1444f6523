"""Named step statistics: every objective term reported by its name, flags in the same reduce."""

import math

import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.train.step import count_step, reduce_stats


def test_terms_are_reported_by_name_with_loads():
    terms = {"loss": torch.tensor(2.5), "ce": torch.tensor(2.0), "kl": torch.tensor(0.25)}
    loads = {3: torch.tensor([0.75, 0.25])}
    stats = reduce_stats(terms, loads, {3: torch.tensor(0.125)}, stop_requested=True, world_size=1)
    assert stats.terms == {"loss": 2.5, "ce": 2.0, "kl": 0.25} and stats.loss == 2.5
    assert stats.stop_requested and not stats.nonfinite
    assert stats.router[3].load == [0.75, 0.25] and stats.router[3].dropped == 0.125
    assert stats.router[3].max_over_mean == 1.5


def test_nonfinite_loss_or_router_state_flags_the_step():
    finite = {"loss": torch.tensor(1.0)}
    assert not reduce_stats(finite, {}, {}, False, 1, torch.tensor(0)).nonfinite
    assert reduce_stats(finite, {}, {}, False, 1, torch.tensor(3)).nonfinite  # e.g. 3 NaN router biases
    bad = reduce_stats({"loss": torch.tensor(math.inf)}, {}, {}, False, 1)
    assert bad.nonfinite and not bad.stop_requested


def test_step_counts_targets_per_micro_batch_and_real_inputs_of_the_step():
    ids = torch.arange(10).view(2, 5)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, :2] = 1
    padded = Batch(ids, labels, real_tokens=torch.tensor([3, 5]))  # row 0 padded after 3 positions
    plain = Batch(ids, ids)  # no padding: every one of its 2 x 5 positions
    counts = count_step([padded, plain], world_size=1, device=torch.device("cpu"))
    assert counts.targets == [2, 10] and counts.step_targets == 12
    assert counts.inputs == (3 + 5) + 2 * 5
