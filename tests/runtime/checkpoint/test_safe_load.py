"""Untrusted checkpoints cannot run code: DCP's pickled `.metadata` goes through an allowlist, its
non-tensor values and the per-rank extras through `weights_only=True` — even when the attacker
also rewrote the manifest so that every hash matches."""

import pickle

import pytest
import torch

from h64lm.runtime.checkpoint import CheckpointError, load_into, read_extras, read_full_state, verify
from h64lm.runtime.checkpoint.manifest import file_digest, read_manifest, write_manifest
from h64lm.runtime.checkpoint.safe_load import load_metadata
from tests.runtime.checkpoint.helpers import saved_run, tiny


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creating the file proves the code ran


def _rehash(step_dir, name):
    """What an attacker who hands over a whole checkpoint does: a manifest that matches."""
    body = read_manifest(step_dir)
    files = {**body["files"], name: file_digest(step_dir / name)}
    write_manifest(step_dir, files, {k: v for k, v in body.items() if k not in ("files", "format", "version")})


def test_malicious_metadata_is_refused_and_never_runs(tmp_path):
    saved_run(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_0000001"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    _rehash(step, ".metadata")
    verify(step)  # every hash matches: only the unpickler stands in the way
    model, opt = tiny()
    with pytest.raises(CheckpointError, match=r"open is not part of DCP's metadata"):
        load_into(step, model, opt)
    with pytest.raises(CheckpointError, match="not part of DCP's metadata"):
        read_full_state(step)
    assert not marker.exists()


def test_metadata_of_another_type_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds a dict, not DCP metadata"):
        load_metadata(pickle.dumps({"a": 1}), "x/.metadata")


def test_malicious_extras_are_refused(tmp_path):
    saved_run(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_0000001"
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _RunsCode(marker)}, step / "extras" / "rank_0.pt")
    _rehash(step, "extras/rank_0.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        read_extras(step)
    assert not marker.exists()


def test_real_metadata_loads_through_the_allowlist(tmp_path):
    saved_run(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_0000001"
    metadata = load_metadata((step / ".metadata").read_bytes(), "m")
    assert "model.0.weight" in metadata.state_dict_metadata
    full = read_full_state(step)  # optimizer hyperparameters are non-tensor values: weights_only
    assert full["optim"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
