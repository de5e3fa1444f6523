"""Training throughput of the parallel layouts on N CPU processes (gloo): DDP, FSDP, and each
with expert parallelism (ep = N). Numbers, not a test.

    python experiments/bench_parallel.py [--procs 2] [--steps 6] [--warmup 2]

Prints one line per layout: global tokens/s (median step time over the timed steps) and the
ratio to DDP. Every layout runs the same model and the same per-rank batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.objectives.lm import lm_loss
from h64lm.parallel import ParallelLayout, build_mesh, build_parallel_model, clip_grad_norm_

CONFIG = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=4,
              num_kv_heads=2, intermediate_size=512, moe_intermediate_size=256, num_experts=8,
              num_experts_per_token=2, moe_layers="all", max_position_embeddings=256)
BATCH, SEQ = 4, 128  # per rank
LAYOUTS = (("ddp", 1), ("fsdp", 1), ("ddp", 0), ("fsdp", 0))  # ep 0 = all ranks


def _run(rank: int, world: int, store: str, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = H64LMConfig(**CONFIG)
    for strategy, ep in LAYOUTS:
        ep = ep or world
        layout = ParallelLayout(world, strategy, ep, cfg.num_experts)
        model = build_parallel_model(lambda: H64LMForCausalLM(cfg), layout, build_mesh(layout, "cpu"), 0,
                                     torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        times = []
        for i in range(args.warmup + args.steps):
            ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            lm_loss(model(ids[:, :-1], labels=ids[:, 1:]), cfg).backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            queue.put((f"{strategy}+ep{ep}" if ep > 1 else strategy,
                       world * BATCH * SEQ / statistics.median(times)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(args.procs, str(Path(tmp) / "store"), args, queue), nprocs=args.procs)
    results = [queue.get() for _ in LAYOUTS]
    base = results[0][1]
    print(f"{args.procs} CPU processes, per-rank batch {BATCH}x{SEQ}, {CONFIG['num_experts']} "
          f"experts top-{CONFIG['num_experts_per_token']}, fp32, gloo")
    for name, rate in results:
        print(f"{name:10s} {rate:9.0f} tokens/s  {rate / base:5.2f}x ddp")


if __name__ == "__main__":
    main()
