"""Hugging Face config of an exported H64LM model (standalone: copied next to the weights).

The fields mirror `h64lm.model.H64LMConfig`; `moe_layer_ids` is the resolved list of sparse layers.
The window is called `attention_window`, not `sliding_window`, so transformers' cache keeps every
slot and the model applies the window itself (it also has to for ALiBi and padding).
"""

from transformers import PretrainedConfig

__all__ = ["H64LMHFConfig"]


class H64LMHFConfig(PretrainedConfig):
    model_type = "h64lm"

    def __init__(self, vocab_size=32000, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=768,
                 moe_intermediate_size=768, num_local_experts=8, num_experts_per_tok=2,
                 moe_layer_ids=(), num_shared_experts=0, capacity_factor=None,
                 eval_capacity_factor=None, norm_topk_prob=True,
                 max_position_embeddings=1024, position_encoding="rope", rope_theta=10000.0,
                 attention_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 initializer_range=0.02, qk_norm=False, logit_softcap=None,
                 weight_init="normal", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_ids = list(moe_layer_ids)
        self.num_shared_experts = num_shared_experts
        self.capacity_factor = capacity_factor  # training mode
        self.eval_capacity_factor = eval_capacity_factor  # eval mode (None: dropless)
        self.norm_topk_prob = norm_topk_prob  # renormalise the k gate weights to sum to one
        self.max_position_embeddings = max_position_embeddings
        self.position_encoding = position_encoding  # "rope", "alibi" or "rope+alibi"
        self.rope_theta = rope_theta
        self.attention_window = attention_window  # a query sees keys j with i - j < W
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.qk_norm = qk_norm  # RMSNorm of each query/key head before RoPE
        self.logit_softcap = logit_softcap  # logits <- c tanh(logits / c) (Gemma 2); None: off
        self.weight_init = weight_init  # how training initialised the weights (h64lm model.init)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
