"""Shared by the parallel tests: a tiny MoE model, one training step, and a gloo process launcher.

The step is deliberately minimal (model, AdamW, a fixed list of global batches, each rank taking
its contiguous rows) so a layout's numbers can be compared with one process running the whole
batch; the full Trainer is not involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.objectives.lm import lm_loss
from h64lm.parallel import ParallelLayout, build_mesh, build_parallel_model, clip_grad_norm_
from h64lm.runtime.checkpoint.sharded import load_sharded, save_consolidated, save_sharded

SEED = 1234
GLOBAL_BATCH, SEQ = 4, 16


def tiny_config(**overrides) -> H64LMConfig:
    # cross-entropy only: the Switch loss is a product of two batch means, not additive over ranks
    base = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                num_experts_per_token=2, moe_layers="all", router_aux_loss_coef=0.0,
                router_z_loss_coef=0.0, max_position_embeddings=64)
    return H64LMConfig(**{**base, **overrides})


def batches(cfg: H64LMConfig, steps: int, seed: int = 7) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
            for _ in range(steps)]


def build(cfg: H64LMConfig, strategy: str, ep: int = 1, prepare: Optional[Callable] = None) -> torch.nn.Module:
    """strategy: single | fsdp | ddp; meta init + materialise for every layout; `prepare(model)`
    edits the full reference model before it is split."""
    if strategy == "single":
        layout, mesh = ParallelLayout(1, "ddp", 1, cfg.num_experts), None
    else:
        layout = ParallelLayout(dist.get_world_size(), strategy, ep, cfg.num_experts)
        mesh = build_mesh(layout, "cpu")
    return build_parallel_model(lambda: H64LMForCausalLM(cfg), layout, mesh, SEED, torch.device("cpu"),
                                prepare=prepare)


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return batch
    b = batch.shape[0] // dist.get_world_size()
    return batch[dist.get_rank() * b:(dist.get_rank() + 1) * b]


def step(model, opt, batch: torch.Tensor) -> Dict[str, float]:
    """One optimizer step on this rank's rows -> global mean loss and the global grad norm."""
    rows = local_rows(batch)
    out = model(rows[:, :-1], labels=rows[:, 1:])
    local = lm_loss(out, config_of(model))
    local.backward()
    norm = clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = local.detach().clone()
    dropped = torch.stack([r["dropped"] for r in out.router]).mean() if out.router else loss * 0
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return {"loss": loss.item(), "grad_norm": norm.item(), "local_loss": local.item(),
            "local_dropped": dropped.item()}


def config_of(model) -> H64LMConfig:
    """The model's config under DDP (`.module`) or FSDP2 (the module itself)."""
    return getattr(model, "module", model).config


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _entry(rank: int, world: int, tmp: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)
    try:
        result = fn(*args)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, tmp: Path, *args) -> List:
    """Run fn(*args) on `world` gloo processes -> each rank's (JSON) return value."""
    tmp.mkdir(parents=True, exist_ok=True)
    # _entry sets one thread in each child; the parent's environment must not keep a setting that
    # later subprocesses of other tests would inherit (their runs are compared bit for bit)
    mp.spawn(_entry, args=(world, str(tmp), fn, args), nprocs=world, join=True)
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def train(cfg_overrides: dict, strategy: str, ep: int, steps: int) -> List[Dict[str, float]]:
    """Build a layout and run `steps` steps on the fixed batches -> per-step numbers."""
    cfg = tiny_config(**cfg_overrides)
    model = build(cfg, strategy, ep)
    opt = optimizer(model)
    return [step(model, opt, b) for b in batches(cfg, steps)]


def local_forward(cfg_overrides: dict, strategy: str, ep: int, steps: int) -> List[Dict]:
    """Forward only, this rank's rows of each batch -> its own loss and dropped fraction."""
    cfg = tiny_config(**cfg_overrides)
    model = build(cfg, strategy, ep)
    results = []
    with torch.no_grad():
        for batch in batches(cfg, steps):
            rows = local_rows(batch)
            out = model(rows[:, :-1], labels=rows[:, 1:])
            results.append({"loss": lm_loss(out, cfg).item(),
                            "dropped": [r["dropped"].item() for r in out.router]})
    return results


def train_save_resume(cfg_overrides: dict, strategy: str, ep: int, steps: int, path: str,
                      save_at: Optional[int], async_save: bool = False) -> List[Dict[str, float]]:
    """save_at=k: train k steps, save a sharded checkpoint (+ consolidated weights) at `path`.
    save_at=None: resume from `path` and train to `steps` -> the numbers of the steps run."""
    cfg = tiny_config(**cfg_overrides)
    model = build(cfg, strategy, ep)
    opt = optimizer(model)
    data = batches(cfg, steps)
    first = 0
    if save_at is None:
        first = load_sharded(Path(path), model, opt)["step"]
    numbers = [step(model, opt, b) for b in data[first:save_at]]
    if save_at is not None:
        handle = save_sharded(Path(path), model, opt, extras={"step": save_at},
                              async_save=async_save)
        if async_save:  # the shards are staged: training could go on while they are written
            assert not Path(path).exists()  # nothing is in place before wait()
            handle.wait()
        save_consolidated(model, Path(path).with_suffix(".safetensors"))
    return numbers


def shift_weights(model: torch.nn.Module) -> None:
    """A stand-in for train.init_from: every parameter of the full model moved by its index."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))


def full_weights_summary(cfg_overrides: dict, strategy: str, ep: int, prepared: bool) -> Dict[str, List[float]]:
    """The full (gathered) state dict of a freshly built layout -> {name: [sum, sum of squares]}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = build(tiny_config(**cfg_overrides), strategy, ep, shift_weights if prepared else None)
    model = getattr(model, "module", model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: [v.double().sum().item(), v.double().square().sum().item()] for k, v in state.items()}


def assert_same_numbers(expected: List[Dict[str, float]], got: List[Dict[str, float]]) -> None:
    """Per-step loss and grad norm equal up to reduction-order rounding (1e-5 relative)."""
    import pytest

    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)

