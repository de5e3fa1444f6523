"""A reward model (`model.score_head`, stage=reward) as a stock `*ForSequenceClassification`.

transformers' sequence classifiers put a bias-free `score` Linear(hidden, num_labels) on the final
normed hidden states and read it at each row's last token that is not `pad_token_id`: exactly our
convention (a sequence's reward is `out.scores` at its last real token, the `</s>`), with
num_labels = 1 and pad_token_id = Mistral's `<unk>` (the preference rows' padding; EOS cannot be
the pad id, it is the token read).

Only stock classes carry this head: the family is the first of `STOCK_ARCHITECTURES` that both
expresses the variant exactly and has a `*ForSequenceClassification` class (Llama, Mistral, Qwen3,
Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5.24; Ernie 4.5 MoE and GLM-4.5 MoE have none). The
default `model=tiny` (MoE on odd layers) goes to Qwen2-MoE; a variant only Ernie or GLM expresses
(an aux-free selection bias, `model.router_bias_update_rate > 0`) or only the custom format
expresses is refused in one line naming the `model.*` options that block Qwen2-MoE, the most
general classifier family. The custom format gets no classifier class: a reward model exported
there would load only through our own code, which `mode=eval` already is.
"""

from typing import Optional

import torch

from h64lm.model import H64LMForCausalLM

from .stock import STOCK_ARCHITECTURES, stock_blockers, stock_config, to_stock_state_dict

__all__ = ["classifier_architecture", "to_hf_sequence_classifier"]


def _classifier_class(family: str):
    import transformers

    return getattr(transformers, STOCK_ARCHITECTURES[family] + "ForSequenceClassification", None)


def classifier_architecture(c) -> str:
    """The stock family whose *ForSequenceClassification computes this reward model; ValueError
    (one line, naming the blocking `model.*` options) when there is none."""
    if not c.score_head:
        raise ValueError("the model has no scalar head (model.score_head=false): only a stage=reward run "
                         "exports as a sequence classifier")
    for family in STOCK_ARCHITECTURES:
        if not stock_blockers(c, family) and _classifier_class(family) is not None:
            return family
    raise ValueError("cannot export the reward model: no stock transformers *ForSequenceClassification class "
                     "expresses this variant (the most general, qwen2_moe, lacks: "
                     + "; ".join(stock_blockers(c, "qwen2_moe")) + "); train the reward model with those model.* "
                     "options changed")


@torch.no_grad()
def to_hf_sequence_classifier(model: H64LMForCausalLM, pad_token_id: int, architecture: Optional[str] = None):
    """The stock sequence classifier (num_labels = 1) equal to `model`'s scalar head at each row's
    last non-pad token (its device, dtype and train/eval mode). The LM head is left out."""
    c = model.config
    family = architecture or classifier_architecture(c)
    hf = _classifier_class(family)(stock_config(c, family, num_labels=1, pad_token_id=pad_token_id))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    ours = model.state_dict()
    state = to_stock_state_dict({k: v for k, v in ours.items() if not k.startswith("score.")}, c, family)
    del state["lm_head.weight"]
    state["score.weight"] = ours["score.weight"]
    hf.load_state_dict({k: v.to(hf.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return hf.train(model.training)
