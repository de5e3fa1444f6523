"""Checkpoints: atomic, checksummed, pickle-safe, and resume=auto falls back past bad files."""

import errno
import os

import pytest
import torch
from torch import nn

from h64lm.train import checkpoint as ck


def _state(step: int) -> dict:
    return {"format_version": ck.FORMAT_VERSION, "step": step, "w": torch.full((64,), float(step))}


def test_roundtrip_and_checksum(tmp_path):
    path = tmp_path / "a.pt"
    ck.save_checkpoint(_state(3), path)
    assert (tmp_path / "a.pt.sha256").exists()
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.full((64,), 3.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_manager_keeps_last_k_and_links_last(tmp_path):
    mgr = ck.CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(_state(step), step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert ck.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_checkpoint_detected_and_resume_falls_back(tmp_path, damage):
    mgr = ck.CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        mgr.save(_state(step), step)
    newest = tmp_path / "checkpoints" / "step_0000002.pt"
    if damage == "bitflip":
        _flip_byte(newest)
    else:
        newest.write_bytes(newest.read_bytes()[:50])
    with pytest.raises(ck.CheckpointError, match="step_0000002.pt is corrupt"):
        ck.load_checkpoint(newest)
    skipped = []
    found = ck.find_resume_checkpoint(tmp_path / "checkpoints", log=skipped.append)
    assert found.name == "step_0000001.pt"
    assert any("last.pt" in s for s in skipped)  # last.pt is the same (damaged) file


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": ck.FORMAT_VERSION, "payload": _Evil()}, path)
    with pytest.raises(ck.CheckpointError, match="refused to load"):
        ck.load_checkpoint(path, verify=False)
    assert not (tmp_path / "PWNED").exists()


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr = ck.CheckpointManager(tmp_path, keep_last=2)
    mgr.save(_state(1), 1)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(ck.CheckpointError, match="No space left on device"):
        mgr.save(_state(2), 2)
    monkeypatch.setattr(ck.torch, "save", real_save)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.pt", "last.pt.sha256", "step_0000001.pt", "step_0000001.pt.sha256"]
    assert ck.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"hello": 1}, path)
    with pytest.raises(ck.CheckpointError, match="not an H64LM checkpoint"):
        ck.load_checkpoint(path, verify=False)
    path.write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="cannot be read"):
        ck.load_checkpoint(path, verify=False)


def test_prefixes_stripped_and_partial_load_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    wrapped = {f"module._orig_mod.{k}": v.clone() + 1 for k, v in model.state_dict().items()}
    missing, unexpected = ck.load_model_state(model, wrapped)
    assert missing == [] and unexpected == []
    assert torch.equal(model[0].weight, wrapped["module._orig_mod.0.weight"])
    partial = {"0.weight": torch.zeros(2, 2), "extra.bias": torch.zeros(1)}
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_model_state(model, partial)
    missing, unexpected = ck.load_model_state(model, partial, strict=False)
    assert set(missing) == {"0.bias", "1.weight", "1.bias"} and unexpected == ["extra.bias"]


def test_resolve_checkpoint_path_accepts_run_dir(tmp_path):
    mgr = ck.CheckpointManager(tmp_path, keep_last=2)
    mgr.save(_state(5), 5)
    assert ck.resolve_checkpoint_path(tmp_path).name == "last.pt"
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.resolve_checkpoint_path(tmp_path / "nope.pt")


def test_safetensors_weights_roundtrip_with_tied_weights(tmp_path):
    a = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    a[1].weight = a[0].weight
    ck.save_weights(a, tmp_path / "w.safetensors")
    b = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    b[1].weight = b[0].weight
    from safetensors.torch import load_model

    load_model(b, str(tmp_path / "w.safetensors"))  # the safetensors library's own loader
    assert torch.equal(a[0].weight, b[0].weight)
    mode = (tmp_path / "w.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as readable as every other output (safetensors writes 0600)


def test_weights_only_loading_accepts_every_type_the_trainer_stores(tmp_path):
    # weights_only loading must accept everything the trainer stores (tuples, lists, strings).
    state = {"format_version": ck.FORMAT_VERSION, "rng": {"python": (3, tuple(range(5)), None)},
             "config": "a: 1\n", "overrides": ["x=1"], "hist": {"val": [1.0, 2.0]}}
    ck.save_checkpoint(state, tmp_path / "s.pt")
    assert ck.load_checkpoint(tmp_path / "s.pt")["rng"]["python"][1] == tuple(range(5))

