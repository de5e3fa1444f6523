"""Training-step time of the `recipe` sweep's arms (AdamW / Muon x QK-norm x logit soft-capping).

A sweep runs its jobs one after another, so on a shared machine their `train s` columns also
measure whatever else ran meanwhile. This times one training step (forward, backward, clipping,
optimizer step) of every arm in one process, alternating the arms round by round, and prints
each arm's median against the first arm's: the ratio that sets an equal-wall-time comparison
(an arm k times slower gets max_steps / k steps in the same seconds).

    python experiments/bench_recipe.py [--rounds 5] [--steps 4] [--arms "optim=adamw" "optim=muon" ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from h64lm.config import build_run_config, compose
from h64lm.model import H64LMForCausalLM
from h64lm.objectives.lm import lm_loss
from h64lm.optim.optimizer import build_optimizer

RECIPE_ARMS = [f"optim={o} model.qk_norm={q} model.logit_softcap={c}"
               for o in ("adamw", "muon") for q in ("false", "true") for c in ("null", "15")]


def _arm(overrides: str, tokens: torch.Tensor):
    """-> a function running one training step of the composed model and optimizer."""
    run = build_run_config(compose(overrides.split()))
    torch.manual_seed(0)
    model = H64LMForCausalLM(run.model)
    optimizer = build_optimizer(model, run.optim, torch.device("cpu"))

    def step() -> None:
        lm_loss(model(tokens, labels=tokens, return_logits=False), run.model).backward()  # as the trainer
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per arm and round")
    parser.add_argument("--arms", nargs="+", default=RECIPE_ARMS, help="override strings; the first is the baseline")
    args = parser.parse_args()
    base_run = build_run_config(compose(args.arms[0].split()))
    batch, seq_len = base_run.train.batch_size, base_run.data.seq_len
    tokens = torch.randint(0, base_run.model.vocab_size, (batch, seq_len))
    steps = {arm: _arm(arm, tokens) for arm in args.arms}
    times: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for step in steps.values():  # warm-up: allocator, optimizer state
        step()
    for _ in range(args.rounds):
        for arm, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[arm].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[args.arms[0]])
    print(f"training step, {batch} x {seq_len} tokens, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps:")
    for arm in args.arms:
        t = statistics.median(times[arm])
        print(f"  {arm:55s} {t * 1e3:8.1f} ms  {batch * seq_len / t:8,.0f} tokens/s  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
