"""The trainer's one path at 2 gloo processes (FSDP + expert parallelism) against 1 process, in
the default test run: tiny shapes, 2 steps, labels partly masked.

The two layouts cut the step into different micro-batches (1 process: 2 x 4 rows; 2 processes:
2 x 2 rows per rank), and the masked labels (every target divisible by 3) leave each micro-batch
a different number of targets; only a loss normalised by the step's global target count makes
the two runs take the same step (a mean of per-micro-batch means would not). The Switch loss
(a product of two micro-batch means) depends on the cut, so it is off here; the z-loss, a
per-token mean over equal-sized micro-batches, stays on."""

import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from h64lm.data import IGNORE_INDEX, Batch, TokenLoader
from h64lm.objectives import LanguageModelling
from h64lm.runtime.distributed import Dist
from h64lm.train.metrics import read_metrics
from h64lm.train.stage import Stage
from tests.helpers import FAST, run_config

ARGS = FAST + ["model.router_aux_loss_coef=0", "train.global_batch_size=8", "train.max_steps=2",
               "train.eval_every=2", "train.save_every=2", "train.sample_tokens=0", "data.val_windows=2",
               "optim.schedule_steps=2", "optim.warmup_steps=1", "logger=none"]


class MaskedLoader:
    """The pretraining loader with every target divisible by 3 ignored (content-based: the same
    tokens are masked whichever rank reads them)."""

    def __init__(self, inner):
        self.inner = inner

    def next_batch(self) -> Batch:
        b = self.inner.next_batch()
        return Batch(b.input_ids, b.labels.masked_fill(b.labels % 3 == 0, IGNORE_INDEX))

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def masked_stage(run, d, tokenizer) -> Stage:
    """Seeded random tokens instead of a prepared corpus (no tokenising in every process)."""
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, 4000).astype(np.uint32)
    loader = TokenLoader(tokens[:3000], run.data.seq_len, run.train.batch_size, run.train.seed, d.rank, d.world_size)
    return Stage(MaskedLoader(loader), LanguageModelling(run.model), tokens[3000:])


def _fit(args, run_dir, rank=0, world=1):
    from h64lm.train.loop import Trainer

    torch.set_num_threads(1)
    run_dir.mkdir(exist_ok=True)
    d = Dist(rank, world, torch.device("cpu"))
    Trainer(run_config(args), run_dir, args, d, stage=masked_stage).fit()


def _worker(rank, world, store, args, run_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _fit(args, run_dir, rank, world)
    finally:
        dist.destroy_process_group()


def test_fsdp_with_expert_parallel_equals_one_process_on_masked_labels(tmp_path):
    base = ARGS + ["hardware=cpu"]
    _fit(base + ["train.batch_size=4"], tmp_path / "one")
    two = base + ["train.batch_size=2", "hardware.strategy=fsdp", "hardware.ep=2"]
    store = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, store, two, tmp_path / "two"), nprocs=2, join=True)

    one, got = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in got] == [1, 2] and [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, got):
        for key in ("loss", "ce", "z", "grad_norm", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert got[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    for name in ("one", "two"):  # one layout at every world size
        assert (tmp_path / name / "checkpoints" / "step_0000002" / "manifest.json").is_file()
