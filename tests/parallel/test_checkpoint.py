"""DCP sharded checkpoints: atomic, verified, and resumable at another layout."""

import json

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import load_model as load_weights  # strict by default

from h64lm.model import H64LMForCausalLM
from h64lm.runtime.checkpoint.sharded import (
    ShardedCheckpointError,
    load_sharded,
    save_consolidated,
    save_sharded,
    verify_sharded,
)
from tests.parallel.harness import assert_same_numbers, build, optimizer, spawn, tiny_config, train, train_save_resume

STEPS, SAVE_AT = 5, 2


def test_one_process_save_resume_and_integrity(tmp_path):
    ckpt = tmp_path / "step_2"
    uninterrupted = train({}, "single", 1, STEPS)
    train_save_resume({}, "single", 1, STEPS, str(ckpt), SAVE_AT)
    assert not (tmp_path / ".step_2.tmp").exists()  # renamed into place
    assert verify_sharded(ckpt)["world_size"] == 1
    resumed = train_save_resume({}, "single", 1, STEPS, str(ckpt), None)
    assert_same_numbers(uninterrupted[SAVE_AT:], resumed)

    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes() + b"x")
    model = build(tiny_config(), "single")
    with pytest.raises(ShardedCheckpointError, match="the manifest says"):
        load_sharded(ckpt, model, optimizer(model))
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ShardedCheckpointError, match="did not finish"):
        verify_sharded(ckpt)


def test_extras_are_plain_data(tmp_path):
    model = build(tiny_config(), "single")
    rng = torch.get_rng_state()
    save_sharded(tmp_path / "c", model, extras={"step": 3, "loader": [1, 2], "rng": rng})
    extras = load_sharded(tmp_path / "c", build(tiny_config(), "single"))
    assert extras["step"] == 3 and extras["loader"] == [1, 2]
    assert torch.equal(extras["rng"], rng)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]["extras/rank_0.pt"]["sha256"]


@pytest.mark.slow
def test_fsdp_ep2_checkpoint_resumes_in_one_process_and_back(tmp_path):
    uninterrupted = train({}, "single", 1, STEPS)
    # 2-rank FSDP + EP=2 saves; one process resumes
    ckpt = tmp_path / "from_two"
    spawn(train_save_resume, 2, tmp_path / "save2", {}, "fsdp", 2, STEPS, str(ckpt), SAVE_AT)
    assert verify_sharded(ckpt)["world_size"] == 2
    assert_same_numbers(uninterrupted[SAVE_AT:],
                          train_save_resume({}, "single", 1, STEPS, str(ckpt), None))
    # the consolidated weights equal one process's after the same steps
    plain = H64LMForCausalLM(tiny_config())
    load_weights(plain, ckpt.with_suffix(".safetensors"))
    train_save_resume({}, "single", 1, STEPS, str(tmp_path / "from_one"), SAVE_AT)
    single = H64LMForCausalLM(tiny_config())  # tied tensors are stored once: load, then compare
    load_weights(single, (tmp_path / "from_one").with_suffix(".safetensors"))
    for (name, value), other in zip(plain.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6, msg=name)
    # one process saved; 2-rank FSDP + EP=2 resumes
    runs = spawn(train_save_resume, 2, tmp_path / "load2", {}, "fsdp", 2, STEPS,
                 str(tmp_path / "from_one"), None)
    for run in runs:
        assert_same_numbers(uninterrupted[SAVE_AT:], run)


@pytest.mark.slow
def test_async_save_with_ddp_resumes_in_one_process(tmp_path):
    uninterrupted = train({}, "single", 1, STEPS)
    ckpt = tmp_path / "async"
    spawn(train_save_resume, 2, tmp_path / "run", {}, "ddp", 1, STEPS, str(ckpt), SAVE_AT, True)
    assert verify_sharded(ckpt)["world_size"] == 2
    assert_same_numbers(uninterrupted[SAVE_AT:],
                          train_save_resume({}, "single", 1, STEPS, str(ckpt), None))


def test_consolidated_weights_load_into_a_plain_tied_model(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    model = build(cfg, "single")
    save_consolidated(model, tmp_path / "best.safetensors")
    plain = H64LMForCausalLM(cfg)
    load_weights(plain, tmp_path / "best.safetensors")  # strict: every key accounted for
    assert "lm_head.weight" not in load_file(str(tmp_path / "best.safetensors"))
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
