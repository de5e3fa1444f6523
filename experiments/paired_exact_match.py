"""Did a post-training stage move exact match beyond noise? Greedy answers of several checkpoints
to the same held-out arithmetic test problems, compared problem by problem.

    python experiments/paired_exact_match.py BASE RUN [RUN ...] [--examples 500]
                                             [--max-new-tokens 48] [--threads N] [--out FILE]

BASE and each RUN are run directories or checkpoints (any layout). Prints each one's exact match
on the first `--examples` test problems (h64lm/eval/exact_match.py: the split `mode=eval`, the
training callbacks and the pipeline's table score) and, for every RUN against BASE, the paired difference with two
standard errors. Paired, because the runs answer the same problems: the error of a difference is
the spread of the per-problem differences, far below two independent 200-problem errors when two
runs agree on most problems. Also McNemar's counts: problems only BASE solves, only RUN solves.
`--out` writes the per-problem outcomes as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from h64lm.eval.exact_match import arithmetic_solved, paired_diff
from h64lm.runtime.checkpoint import load_trained_model

__all__ = ["solved", "main"]


def solved(checkpoint: str, examples: int, max_new_tokens: int, batch_size: int = 64) -> list[bool]:
    """Per test problem: does the checkpoint's greedy answer end with the right `#### N`?"""
    model, _ = load_trained_model(checkpoint, torch.device("cpu"))
    return arithmetic_solved(model, examples, max_new_tokens, batch_size)


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
