"""Validation loss over batches of masked targets against a naive per-token loop."""

import math

import pytest
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.eval.validation import evaluate_batches
from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import resolve_precision

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)


def _model() -> H64LMForCausalLM:
    torch.manual_seed(0)
    return H64LMForCausalLM(H64LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2,
                                        num_kv_heads=1, intermediate_size=64, moe_intermediate_size=32,
                                        num_experts=4)).eval()


def _batch(gen: torch.Generator, rows: int, T: int, keep: float) -> Batch:
    ids = torch.randint(0, 64, (rows, T), generator=gen)
    labels = torch.randint(0, 64, (rows, T), generator=gen)
    labels[torch.rand(rows, T, generator=gen) > keep] = IGNORE_INDEX
    docs = (torch.arange(T) >= T // 2).long().expand(rows, T).contiguous()  # two documents per row
    return Batch(ids, labels, docs)


def test_loss_is_the_mean_over_every_target_token():
    """A sparsely and a densely labelled batch: each target token weighs the same (not each batch)."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    batches = [_batch(gen, 3, 16, 0.1), _batch(gen, 2, 16, 0.9)]
    per_batch = []  # naive: every target token of every row, one row at a time, in float64
    with torch.no_grad():
        for b in batches:
            losses = []
            for row in range(len(b.input_ids)):
                logits = model(b.input_ids[row:row + 1], document_ids=b.document_ids[row:row + 1]).logits[0]
                for t in range(logits.shape[0]):
                    if b.labels[row, t] != IGNORE_INDEX:
                        losses.append(-torch.log_softmax(logits[t].double(), -1)[b.labels[row, t]].item())
            per_batch.append(losses)
    every = [x for losses in per_batch for x in losses]
    loss, ppl = evaluate_batches(model, batches, FP32, Dist(0, 1, CPU))
    assert loss == pytest.approx(sum(every) / len(every), rel=1e-5)
    assert ppl == pytest.approx(math.exp(loss))
    mean_of_means = sum(sum(x) / len(x) for x in per_batch) / len(per_batch)
    assert abs(loss - mean_of_means) > 1e-4  # the weighting is visible in this data


def test_a_stop_request_returns_none():
    gen = torch.Generator().manual_seed(1)
    assert evaluate_batches(_model(), [_batch(gen, 1, 8, 0.5)], FP32, Dist(0, 1, CPU),
                            should_stop=lambda: True) is None
