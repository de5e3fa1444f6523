"""A reward model exports as a stock *ForSequenceClassification that transformers loads with the
same scores; a policy export leaves the scalar head out; a variant no classifier expresses is
refused in one line."""

import pytest
import torch

from h64lm.hf import to_hf_model
from h64lm.hf.sequence_classification import classifier_architecture, to_hf_sequence_classifier
from h64lm.model import H64LMConfig, H64LMForCausalLM
from tests.hf.tiny import SMALL


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from h64lm.cli import run
    from tests.helpers import FAST, run_config

    args = [a for a in FAST if not a.startswith("data.")] + [
        "stage=reward", "data=preference_arithmetic", "data.seq_len=96", "data.max_samples=24",
        "train.max_steps=2", "train.eval_every=2", "train.sample_tokens=0"]
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    run(run_config(args), run_dir, args)
    return run_dir


def test_exported_reward_model_loads_in_transformers_with_our_scores(reward_run, tmp_path):
    """mode=export of a stage=reward run -> AutoModelForSequenceClassification gives each padded
    preference row the score our model has at the row's </s>, to 1e-4."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from h64lm.cli import run
    from h64lm.data.config import DataConfig
    from h64lm.data.preference_batches import PAD_ID, build_preference_data
    from h64lm.runtime.checkpoint import load_trained_model
    from tests.helpers import run_config

    out = tmp_path / "hf"
    args = ["mode=export", f"checkpoint={reward_run}", f"out={out}", "hardware=cpu", "logger=none"]
    run(run_config(args), tmp_path, args)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "Qwen2MoeForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD_ID
    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id == PAD_ID
    model, _ = load_trained_model(reward_run, torch.device("cpu"))
    _, val_batches, _ = build_preference_data(DataConfig(name="preference_arithmetic", max_samples=24, seq_len=96),
                                              batch_size=2, val_batch_size=4, seed=0)
    batch = val_batches[0]
    assert (batch.input_ids == PAD_ID).any()  # rows of different lengths: the padding is exercised
    with torch.no_grad():
        ours = model(batch.input_ids, return_logits=False).scores.gather(1, batch.extras["last"][:, None])
        theirs = hf(input_ids=batch.input_ids).logits  # [B, 1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert ours.std() > 0  # not a constant the check could not tell apart


def test_policy_export_leaves_the_score_head_out():
    torch.manual_seed(0)
    for extra in ({}, {"logit_softcap": 30.0}):  # a stock class and the custom format
        model = H64LMForCausalLM(H64LMConfig(**SMALL, score_head=True, **extra)).eval()
        hf = to_hf_model(model)
        assert not any(k.startswith(("score.", "model.score.")) for k in hf.state_dict())
        ids = torch.randint(3, 192, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_classifier_pools_the_last_non_pad_token():
    """Rows right-padded with the pad id: the stock classifier reads each row's last real token."""
    torch.manual_seed(0)
    model = H64LMForCausalLM(H64LMConfig(**SMALL, score_head=True)).eval()
    hf = to_hf_sequence_classifier(model, pad_token_id=0)
    ids = torch.randint(3, 192, (3, 10))
    ids[0, 7:] = 0
    ids[1, 9:] = 0
    with torch.no_grad():
        ours = model(ids, return_logits=False).scores[torch.arange(3), torch.tensor([6, 8, 9])]
        torch.testing.assert_close(hf(input_ids=ids).logits.squeeze(-1), ours, rtol=0, atol=1e-5)


def test_a_variant_without_a_stock_classifier_is_refused_in_one_line():
    aux_free = H64LMConfig(**SMALL, score_head=True, router_bias_update_rate=1e-3)  # Ernie-only routing
    with pytest.raises(ValueError, match=r"^cannot export the reward model: .*model\.router_score / "
                                         r"router_bias_update_rate") as err:
        classifier_architecture(aux_free)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"model\.score_head=false"):
        classifier_architecture(H64LMConfig(**SMALL))
