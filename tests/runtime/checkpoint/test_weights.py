"""Weights on their own: wrapper prefixes stripped, partial loads reported, tied safetensors."""

import os

import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn

from h64lm.runtime.checkpoint import CheckpointError, load_model_state, save_consolidated


def test_prefixes_stripped_and_partial_load_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    wrapped = {f"module._orig_mod.{k}": v.clone() + 1 for k, v in model.state_dict().items()}
    assert load_model_state(model, wrapped) == ([], [])
    assert torch.equal(model[0].weight, wrapped["module._orig_mod.0.weight"])
    partial = {"0.weight": torch.zeros(2, 2), "extra.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(model, partial)
    missing, unexpected = load_model_state(model, partial, strict=False)
    assert set(missing) == {"0.bias", "1.weight", "1.bias"} and unexpected == ["extra.bias"]


def test_one_process_weights_with_tied_tensors(tmp_path):
    a = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    a[1].weight = a[0].weight
    save_consolidated(a, tmp_path / "w.safetensors")
    assert list(load_file(str(tmp_path / "w.safetensors"))) == ["0.weight"]  # stored once
    b = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    b[1].weight = b[0].weight
    load_model(b, str(tmp_path / "w.safetensors"))  # the safetensors library's own strict loader
    assert torch.equal(a[0].weight, b[0].weight)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
