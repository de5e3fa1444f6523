"""train.freeze / train.trainable: frozen parameters stay bit-identical and out of the optimizer;
the SFT stage logs routing changes against the starting model."""

import pytest
import torch

from h64lm.model.moe import routing_snapshot
from h64lm.model.moe.stats import top1_changed
from h64lm.runtime.distributed import Dist
from h64lm.train.freeze import frozen_names
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import run_config
from tests.train.test_stage import SFT

ONE = Dist(0, 1, torch.device("cpu"))
NAMES = ["embed_tokens.weight", "layers.1.ffn.router.weight", "layers.1.ffn.experts.gate_up_proj",
         "layers.1.ffn.experts.down_proj", "layers.1.attn.qkv_proj.weight"]


def test_patterns_pick_names():
    assert frozen_names(NAMES, ["router"], []) == ["layers.1.ffn.router.weight"]
    assert frozen_names(NAMES, [], ["experts"]) == [NAMES[0], NAMES[1], NAMES[4]]
    assert frozen_names(NAMES, ["down_proj$"], ["experts"]) == [NAMES[0], NAMES[1], NAMES[3], NAMES[4]]
    with pytest.raises(ConfigError, match=r"^train.freeze: 'routr' matches no parameter name"):
        frozen_names(NAMES, ["routr"], [])
    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        frozen_names(NAMES, ["."], [])
    with pytest.raises(ConfigError, match=r"^train.trainable: '\(' is not a regular expression"):
        run_config(["train.trainable=[\"(\"]"])


@pytest.mark.parametrize("optim", ["muon", "adamw"])
@pytest.mark.parametrize("choice, frozen_if", [
    ("train.freeze=[router]", lambda n: "router" in n),
    ("train.trainable=[experts]", lambda n: "experts" not in n),
])
def test_frozen_parameters_stay_bit_identical(tmp_path, optim, choice, frozen_if):
    from h64lm.train.loop import Trainer

    args = SFT + [choice, f"optim={optim}", "train.max_steps=3", "stage.eval_examples=0"]
    trainer = Trainer(run_config(args), tmp_path, args, ONE)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    windows = torch.cat([b.input_ids for b in trainer.val_batches])[:8]
    start = routing_snapshot(trainer.model, windows.split(4))
    trainer.fit()
    frozen = [n for n in before if frozen_if(n)]
    assert frozen and len(frozen) < len(before)
    for n, p in trainer.model.named_parameters():
        assert (not p.requires_grad) == (n in frozen), n
        assert (id(p) in in_optimizer) == (n not in frozen), n
        same = torch.equal(p.detach(), before[n])
        assert same == (n in frozen), f"{n}: {'unchanged' if same else 'changed'}"
    # the logged share of changed top-1 experts is against the model before its first step
    record = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "routing" in r][-1]
    now = routing_snapshot(trainer.model, windows.split(4))
    for layer, top1 in now["top1"].items():
        logged = record["routing"][str(layer)]
        assert logged["top1_changed_from_start"] == pytest.approx(top1_changed(start["top1"][layer], top1))
        assert "router_entropy" in logged and "load_max_over_mean" in logged
