"""Evaluation speed with and without the LM head's backward work under `torch.no_grad()`.

The chunked cross-entropy once decided from `ctx.needs_input_grad`, which is True under no_grad
when the weights require grad, so every validation batch also computed the head's two gradient
GEMMs. This times `h64lm.eval.samples.evaluate` on the default model both ways in one process,
alternating A B A B, and prints the medians and their ratio.

    python experiments/bench_eval.py [--rounds 5] [--windows 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from h64lm.eval.samples import evaluate
from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.model import loss as loss_module
from h64lm.model import model as model_module
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import resolve_precision


def _old_loss(hidden, weight, labels, chunk=loss_module.CHUNK_TOKENS):
    """The previous behaviour: gradients computed whenever an input requires grad."""
    return loss_module._ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = H64LMForCausalLM(H64LMConfig())  # model=tiny, weights require grad as in training
    windows = torch.randint(0, 32000, (args.windows, 257))
    cpu = torch.device("cpu")
    d, precision = Dist(rank=0, world_size=1, device=cpu), resolve_precision("fp32", cpu)
    new_loss = model_module.chunked_cross_entropy
    times: dict[str, list[float]] = {"old": [], "new": []}
    evaluate(model, windows[:8], 8, precision, d)  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("old", _old_loss), ("new", new_loss)):
            model_module.chunked_cross_entropy = fn
            start = time.perf_counter()
            evaluate(model, windows, 8, precision, d)
            times[name].append(time.perf_counter() - start)
    model_module.chunked_cross_entropy = new_loss
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    tokens = args.windows * 256
    print(f"evaluation of {tokens} tokens, tiny, fp32, {torch.get_num_threads()} threads, median of {args.rounds}:")
    print(f"  with the head's backward (before): {old * 1e3:8.1f} ms  {tokens / old:10,.0f} tokens/s")
    print(f"  without it (now):                  {new * 1e3:8.1f} ms  {tokens / new:10,.0f} tokens/s")
    print(f"  speed-up: {old / new:.2f}x")


if __name__ == "__main__":
    main()
