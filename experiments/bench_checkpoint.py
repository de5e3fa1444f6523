"""What verifying a checkpoint costs: save `model=demo` (249M parameters) with its optimizer state
in one process, then time `verify` (size + SHA-256 of every file) against reading it back.

    python experiments/bench_checkpoint.py [--model demo] [--optim adamw] [--dir DIR] [--keep]

Prints the checkpoint's size and the seconds of save, verify (cold: first hash; warm: a repeat
in this process is a stat check) and load; deletes the files unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from h64lm.model import H64LMForCausalLM
from h64lm.objectives.lm import lm_loss
from h64lm.optim.optimizer import build_optimizer
from h64lm.runtime.checkpoint import Checkpointer, trust, verify
from tests.helpers import run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--optim", default="adamw")
    parser.add_argument("--dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    run = run_config([f"model={opts.model}", f"optim={opts.optim}"])
    torch.manual_seed(0)
    model = H64LMForCausalLM(run.model)
    optimizer = build_optimizer(model, run.optim, torch.device("cpu"))
    out = model(torch.randint(0, run.model.vocab_size, (1, 8)), labels=torch.randint(0, 100, (1, 8)))
    lm_loss(out, run.model).backward()
    optimizer.step()  # the optimizer state exists (Adam moments: 2 more copies of the weights)
    work = opts.dir or Path(tempfile.mkdtemp(prefix="h64lm-ckpt-bench-"))
    try:
        ckpt = Checkpointer(work, keep_last=1, async_save=False, log=lambda s: None)
        start = time.perf_counter()
        path = ckpt.save(model, optimizer, {"step": 1}, 1, final=True)
        saved = time.perf_counter() - start
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        trust._verified.clear()
        start = time.perf_counter()
        verify(path)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        verify(path)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        ckpt.load(path, model, optimizer)
        loaded = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        print(f"model={opts.model} optim={opts.optim}: {params / 1e6:.0f}M parameters, checkpoint {size / 2**30:.2f} GiB "
              f"({len(list(path.rglob('*')))} files); save {saved:.1f} s (hashing included), verify {cold:.2f} s "
              f"({size / 2**20 / cold:.0f} MiB/s), verify again {warm * 1e3:.1f} ms, load (verify cached) {loaded:.1f} s")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
