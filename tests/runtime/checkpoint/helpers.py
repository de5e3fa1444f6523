"""A tiny model and optimizer saved by the one-process Checkpointer, for the damage tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from h64lm.runtime.checkpoint import FORMAT_VERSION, Checkpointer


def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def saved_run(run_dir: Path, steps=(1, 2, 3), keep_last: int = 5) -> Checkpointer:
    model, opt = tiny()
    ckpt = Checkpointer(run_dir, keep_last, async_save=False, log=lambda s: None)
    for s in steps:
        with torch.no_grad():
            model[0].weight.add_(1.0)  # each step's weights differ
        ckpt.save(model, opt, {"format_version": FORMAT_VERSION, "step": s, "note": [s, "x"]}, s, final=False)
    return ckpt


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
