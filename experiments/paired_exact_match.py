"""Did a post-training stage move exact match beyond noise? Greedy answers of several checkpoints
to the same held-out arithmetic test problems, compared problem by problem.

    python experiments/paired_exact_match.py BASE RUN [RUN ...] [--examples 500]
                                             [--max-new-tokens 48] [--threads N] [--out FILE]

BASE and each RUN are run directories or checkpoints (any layout). Prints each one's exact match
on the first `--examples` test problems (h64lm/eval/exact_match.py: the split `mode=eval` and the
training callbacks score) and, for every RUN against BASE, the paired difference with two
standard errors. Paired, because the runs answer the same problems: the error of a difference is
the spread of the per-problem differences, far below two independent 200-problem errors when two
runs agree on most problems. Also McNemar's counts: problems only BASE solves, only RUN solves.
`--out` writes the per-problem outcomes as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from h64lm.data.chat import ChatFormat
from h64lm.data.tasks.arithmetic import exact_match, make_splits
from h64lm.data.tasks.scoring import answer_questions
from h64lm.runtime.checkpoint import load_trained_model

__all__ = ["PairedDiff", "paired_diff", "solved", "main"]


@dataclass(frozen=True)
class PairedDiff:
    diff: float        # mean of run - base over the problems
    two_se: float      # 2 x the standard error of that mean
    only_base: int     # problems base solves and run does not (McNemar's b)
    only_run: int      # problems run solves and base does not (McNemar's c)

    @property
    def verdict(self) -> str:
        if abs(self.diff) <= self.two_se:
            return "within noise"
        return "higher" if self.diff > 0 else "lower"


def paired_diff(base: Sequence[bool], run: Sequence[bool]) -> PairedDiff:
    """Mean per-problem difference run - base, with 2 SE of that mean (sample std / sqrt n)."""
    if len(base) != len(run) or len(base) < 2:
        raise ValueError(f"paired_diff needs two equally long outcome lists of at least 2 problems "
                         f"(got {len(base)} and {len(run)})")
    d = [int(r) - int(b) for b, r in zip(base, run)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return PairedDiff(mean, 2 * math.sqrt(var / n), d.count(-1), d.count(1))


def solved(checkpoint: str, examples: int, max_new_tokens: int, batch_size: int = 64) -> list[bool]:
    """Per test problem: does the checkpoint's greedy answer end with the right `#### N`?"""
    model, _ = load_trained_model(checkpoint, torch.device("cpu"))
    problems = make_splits()["test"][:examples]
    answers = answer_questions(model, ChatFormat(), [p.question for p in problems],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [exact_match(a, p.answer) for a, p in zip(answers, problems)]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", help="the starting checkpoint (run directory or checkpoint)")
    p.add_argument("runs", nargs="+", help="checkpoints compared against it")
    p.add_argument("--examples", type=int, default=500, help="first N test problems (at most 500)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="write the per-problem outcomes here (JSON)")
    args = p.parse_args(argv)
    if not 2 <= args.examples <= 500:
        p.error(f"--examples={args.examples}: the arithmetic test split has 500 problems; use 2-500")
    if args.threads:
        torch.set_num_threads(args.threads)
    outcomes = {c: solved(c, args.examples, args.max_new_tokens) for c in [args.base, *args.runs]}
    base = outcomes[args.base]
    print(f"exact match on the first {args.examples} test problems (greedy, "
          f"max {args.max_new_tokens} new tokens):")
    print(f"  {args.base}: {sum(base) / len(base):.3f}")
    diffs = {}
    for run in args.runs:
        d = paired_diff(base, outcomes[run])
        diffs[run] = asdict(d) | {"verdict": d.verdict}
        print(f"  {run}: {sum(outcomes[run]) / len(base):.3f}  paired diff {d.diff:+.3f} "
              f"+- {d.two_se:.3f} (2 SE): {d.verdict}; only base solves {d.only_base}, "
              f"only this run {d.only_run}")
    result = {"examples": args.examples, "outcomes": outcomes, "diffs": diffs}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
