"""Where a training step's time goes as the expert count grows: torch.profiler by op at two counts.

    python experiments/profile_experts.py [--experts 8 64] [--hidden 256] [--hf] [--top 25]
                                          [--size tiny|smoke]

Builds the benchmark's network (`experiments/bench.py`: every layer MoE, RoPE, no window, top-2,
expert width fixed) at each expert count, hidden size `--hidden`, batch 8 x 256 and AdamW (frozen weights: every step
routes alike), warms
each model up, then profiles one training step of each (alternating, `--steps` profiled steps
each). Prints the ops with the largest self CPU time, per expert count, with their call counts and
the ratio between the largest and the smallest count: an op whose time or calls grow with the
number of experts stands out (a ratio near 64/8 = 8 for work done once per expert). With --hf the
same for transformers' Mixtral on the same weights, for comparison.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from experiments.bench import batch, bench_config, build_pair
from experiments.bench_measure import train_step

__all__ = ["profile_ops", "print_table", "main"]


def profile_ops(step, steps: int) -> dict[str, tuple[float, int]]:
    """{op: (self CPU seconds per step, calls per step)} over `steps` calls of `step`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1e6 / steps, e.count // steps)
            for e in prof.key_averages()}


def print_table(name: str, ops: dict[int, dict], counts: list[int], top: int) -> None:
    lo, hi = counts[0], counts[-1]
    total = {n: sum(t for t, _ in ops[n].values()) for n in counts}
    print(f"\n{name}: one training step, self CPU time by op (load average "
          f"{os.getloadavg()[0]:.2f})")
    print(f"{'op':<44}" + "".join(f"{f'E={n} ms':>11}{'calls':>7}" for n in counts)
          + f"{f'{hi}/{lo}':>8}")
    keys = sorted(ops[hi], key=lambda k: -ops[hi][k][0])[:top]
    for key in keys:
        cells = "".join(f"{ops[n].get(key, (0, 0))[0] * 1e3:>11.1f}{ops[n].get(key, (0, 0))[1]:>7}"
                        for n in counts)
        base = ops[lo].get(key, (0, 0))[0]
        ratio = f"{ops[hi][key][0] / base:>8.2f}" if base > 0 else f"{'new':>8}"
        print(f"{key[:43]:<44}{cells}{ratio}")
    print(f"{'total':<44}" + "".join(f"{total[n] * 1e3:>11.1f}{'':>7}" for n in counts)
          + f"{total[hi] / total[lo]:>8.2f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "smoke"],
                   help="the bench preset the network starts from (smoke: a toy, for tests)")
    p.add_argument("--experts", nargs="+", type=int, default=[8, 64])
    p.add_argument("--hidden", type=int, default=256, help="0 = the preset's own hidden size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="profiled steps per model")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hf", action="store_true", help="also profile transformers' Mixtral")
    args = p.parse_args(argv)
    counts = sorted(set(args.experts))
    if len(counts) < 2 or min(args.hidden, args.batch, args.seq, args.steps, args.top) < 0:
        raise SystemExit("--experts needs two different counts; sizes and counts must be >= 0")
    device = torch.device("cpu")
    steps = {}
    for n in counts:
        cfg = bench_config(args.size, num_experts=n,
                           **({"hidden_size": args.hidden} if args.hidden else {}))
        ours, hf, opt_ours, opt_hf = build_pair(cfg, device, compile_models=False,
                                                frozen=True)
        x, y = batch(cfg, args.batch, args.seq, device)
        steps[("ours", n)] = train_step(ours, opt_ours, x, y, hf=False, dtype=torch.float32)
        if args.hf:
            steps[("hf", n)] = train_step(hf, opt_hf, x, y, hf=True, dtype=torch.float32)
    for step in steps.values():  # warm-up: allocator, optimizer state
        step()
        step()
    ops = {}
    for key, step in steps.items():
        ops.setdefault(key[0], {})[key[1]] = profile_ops(step, args.steps)
    print(f"threads {torch.get_num_threads()}, hidden {cfg.hidden_size}, batch {args.batch} x "
          f"{args.seq}, top-2, every layer MoE, AdamW")
    for name in ops:
        print_table(name, ops[name], counts, args.top)
    return ops


if __name__ == "__main__":
    main()
