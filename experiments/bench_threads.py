"""Seconds per training step of the default run under several CPU thread settings, side by side.

OpenMP reads its environment (`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`) once, when torch starts its
thread pool, so every setting runs in its own subprocess; the settings alternate round by round
so that the machine's load (other jobs) falls on all of them alike. Each figure is printed with
the 1-minute load average seen when it was taken, and the summary gives medians and the ratio
to one thread.

    python experiments/bench_threads.py [--rounds 5] [--steps 3] [--overrides "train.batch_size=8"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from h64lm.cpu_threads import SPINCOUNT

ROOT = Path(__file__).resolve().parents[1]

# name -> (environment added to the child's, torch.set_num_threads value or None for torch's default)
SETTINGS = {
    "1 thread": ({}, 1),
    "all cores, OpenMP's default spin-wait": ({}, None),
    "all cores, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "all cores, GOMP_SPINCOUNT=10000 (run.py's)": ({"GOMP_SPINCOUNT": SPINCOUNT}, None),
}

_CHILD = """
import json, sys, time
import torch
from h64lm.config import build_run_config, compose
from h64lm.model import H64LMForCausalLM
from h64lm.objectives.lm import lm_loss
from h64lm.optim.optimizer import build_optimizer
threads, steps, overrides = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
run = build_run_config(compose(overrides))
torch.manual_seed(0)
model = H64LMForCausalLM(run.model)
optimizer = build_optimizer(model, run.optim, torch.device("cpu"))
tokens = torch.randint(0, run.model.vocab_size, (run.train.batch_size, run.data.seq_len))
times = []
for i in range(steps + 1):  # the first step (allocator, optimizer state) is not timed
    start = time.perf_counter()
    lm_loss(model(tokens, labels=tokens, return_logits=False), run.model).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "times": times[1:]}))
"""


def _time_setting(env: dict, threads: int | None, steps: int, overrides: list[str]) -> tuple[float, int]:
    """(median seconds per step, threads used) of one fresh process."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                    "OMP_NUM_THREADS")}
    child_env.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([threads, steps, overrides])], env=child_env,
                         cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return statistics.median(result["times"]), result["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per process")
    parser.add_argument("--busy", type=int, default=0,
                        help="also run this many CPU-bound processes meanwhile (a reproducible busy machine)")
    parser.add_argument("--overrides", default="", help="config overrides of the timed run (default: the default run)")
    args = parser.parse_args()
    overrides = args.overrides.split()
    print(f"training step of `python run.py {args.overrides}`, {os.cpu_count()} CPUs, "
          f"{args.busy} extra busy process(es), {args.rounds} rounds x {args.steps} steps, one process per figure")
    medians: dict[str, list[float]] = {name: [] for name in SETTINGS}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for r in range(args.rounds):
            for name, (env, threads) in SETTINGS.items():
                seconds, used = _time_setting(env, threads, args.steps, overrides)
                medians[name].append(seconds)
                print(f"  round {r}  {name:42s} {used} thread(s)  {seconds:7.3f} s/step  "
                      f"load {os.getloadavg()[0]:5.2f}", flush=True)
    finally:
        for p in spinners:
            p.kill()
    one = statistics.median(medians["1 thread"])
    print("median over rounds (ratio to 1 thread):")
    for name, values in medians.items():
        t = statistics.median(values)
        print(f"  {name:42s} {t:7.3f} s/step  {t / one:5.2f}x")


if __name__ == "__main__":
    main()
