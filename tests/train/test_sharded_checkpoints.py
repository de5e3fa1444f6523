"""Sharded step directories beside step files: listing, pointers, pruning, refusals, layout checks."""

import pytest
import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.parallel import ParallelLayout, save_sharded
from h64lm.train import checkpoint as ck
from h64lm.train.distributed import Dist
from h64lm.train.resume import find_resume_state, load_checkpoint_state, run_outputs
from h64lm.train.sharded import ShardedCheckpoints
from h64lm.validation import ConfigError
from tests.helpers import run_config

CFG = H64LMConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, num_kv_heads=1,
                  intermediate_size=32, moe_intermediate_size=16, num_experts=2, max_position_embeddings=16)
ONE = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def _extras(step: int) -> dict:
    return {"format_version": ck.FORMAT_VERSION, "step": step}


def _sharded(tmp_path, steps, keep_last=2) -> ShardedCheckpoints:
    model = H64LMForCausalLM(CFG)
    mgr = ShardedCheckpoints(tmp_path, keep_last, ONE)
    for step in steps:
        mgr.save(model, None, _extras(step), step, background=False)
    return mgr


def test_sharded_saves_point_last_and_prune_both_kinds(tmp_path):
    ck.CheckpointManager(tmp_path, keep_last=2).save(_extras(1), 1)  # an earlier one-process layout
    _sharded(tmp_path, [2, 3])
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_0000002", "step_0000003"]
    assert (ckpts / "last").read_text().strip() == "step_0000003"
    assert ck.find_resume_checkpoint(ckpts) == ckpts / "step_0000003"
    assert load_checkpoint_state(ckpts / "step_0000003")["step"] == 3
    assert "checkpoints/step_0000002" in run_outputs(tmp_path)
    # a one-process save after them: last.pt is newest again and the pointer goes
    ck.CheckpointManager(tmp_path, keep_last=2).save(_extras(4), 4)
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.pt", "last.pt.sha256", "step_0000003", "step_0000004.pt", "step_0000004.pt.sha256"]
    assert [s for s, _ in ck.step_entries(ckpts)] == [4, 3]


def test_resume_skips_an_unverified_directory_and_best_links(tmp_path):
    mgr = _sharded(tmp_path, [2, 3])
    mgr.save_best(None, None, {}, 3)  # the step's directory exists: hard links, no new save
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "best" / ".metadata").stat().st_ino == (ckpts / "step_0000003" / ".metadata").stat().st_ino
    (ckpts / "step_0000003" / ".complete").unlink()  # as if the save had died before its marker
    skipped = []
    assert find_resume_state("auto", tmp_path, 10, skipped.append)["step"] == 2
    assert any("step_0000003" in s and "marker" in s for s in skipped)
    assert ck.resolve_checkpoint_path(ckpts / "best") == ckpts / "best"  # a sharded dir, not a run dir
    with pytest.raises(ConfigError, match="already at step 2"):
        find_resume_state("auto", tmp_path, 2, skipped.append)


def test_unsaved_best_is_written_and_replaces_best_pt(tmp_path):
    ck.CheckpointManager(tmp_path, keep_last=2).save_best(_extras(1), 1)
    model = H64LMForCausalLM(CFG)
    ShardedCheckpoints(tmp_path, 2, ONE).save_best(model, None, _extras(5), 5)
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "best.pt").exists()
    assert load_checkpoint_state(ckpts / "best")["step"] == 5


def test_layout_errors_name_hardware_ep():
    run = run_config(["model.num_experts=4", "hardware.ep=2"])
    with pytest.raises(ConfigError, match=r"hardware.ep=2 must divide the world size 3"):
        ParallelLayout.from_run(run, 3)
    with pytest.raises(ConfigError, match=r"hardware.ep=2 needs MoE layers"):
        ParallelLayout.from_run(run_config(["hardware.ep=2", "model.moe_layers=none"]), 2)
    with pytest.raises(ConfigError, match=r"^hardware.ep=3 must divide model.num_experts=8"):
        run_config(["hardware.ep=3"])
    with pytest.raises(ConfigError, match=r"^hardware.precision=fp16 is not supported with hardware.strategy=fsdp"):
        run_config(["hardware=fsdp", "hardware.precision=fp16"])


def test_directory_without_extras_is_a_run_directory(tmp_path):
    save_sharded(tmp_path / "run" / "checkpoints" / "step_0000001", H64LMForCausalLM(CFG), extras=_extras(1))
    assert ck.is_sharded_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert not ck.is_sharded_checkpoint(tmp_path / "run")
    assert ck.resolve_checkpoint_path(tmp_path / "run").name == "step_0000001"
