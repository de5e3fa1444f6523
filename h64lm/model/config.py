"""H64LMConfig: the model's hyperparameters, also the schema of the Hydra `model` config group.

The defaults are the `tiny` preset (the default run's model); `conf/model/*.yaml` hold only what
differs from them. Only types that OmegaConf structured configs accept are used.
"""

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from h64lm.validation import bounded, check, validate_fields

__all__ = ["H64LMConfig", "POSITION_ENCODINGS", "AUX_LOSS_SCOPES", "ROUTER_SCORES", "CAPACITY_PRIORITIES",
           "INITS", "check_positions"]

POSITION_ENCODINGS = ("rope", "alibi", "rope+alibi")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global")
ROUTER_SCORES = ("softmax", "sigmoid")
CAPACITY_PRIORITIES = ("token", "choice")
INITS = ("normal", "small")
_MOE_LAYER_MODES = ("alternate", "all", "none")


@dataclass
class H64LMConfig:
    config_group: ClassVar[str] = "model"

    vocab_size: int = bounded(32000, ge=1)
    hidden_size: int = bounded(128, ge=1)
    num_layers: int = bounded(4, ge=1)
    num_attention_heads: int = bounded(4, ge=1)
    num_kv_heads: int = bounded(2, ge=1)
    intermediate_size: int = bounded(384, ge=1)  # dense SwiGLU width
    moe_intermediate_size: Optional[int] = bounded(192, ge=1, null="= model.intermediate_size")
    num_experts: int = bounded(8, ge=1)
    num_experts_per_token: int = bounded(2, ge=1)
    # "alternate" (odd layers sparse, as in the original), "all", "none", or a list of indices.
    # Typed Any because OmegaConf structured configs have no Union[str, List[int]].
    moe_layers: Any = "alternate"
    num_shared_experts: int = bounded(0, ge=0)  # DeepSeekMoE experts that see every token
    router_aux_loss_coef: float = bounded(0.01, ge=0)  # Switch load-balancing loss weight
    router_z_loss_coef: float = bounded(0.001, ge=0)  # router z-loss weight
    capacity_factor: Optional[float] = bounded(None, gt=0, null="dropless")
    max_position_embeddings: int = bounded(512, ge=1)
    position_encoding: str = bounded("rope", choices=POSITION_ENCODINGS)
    rope_theta: float = bounded(10000.0, gt=0)
    sliding_window: Optional[int] = bounded(None, ge=1, null="no window")
    rms_norm_eps: float = bounded(1e-5, gt=0)
    # Tied by default: at hidden 128 the 32k x 128 table would otherwise be most of the model.
    tie_word_embeddings: bool = True
    initializer_range: float = bounded(0.02, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)  # residual dropout
    # Activation checkpointing of every block. A training technique the trainer applies from outside
    # the model (h64lm/train/wrap.py; h64lm/train/sharded.py under FSDP/EP); the model never reads it.
    gradient_checkpointing: bool = False
    # Switch loss counts from: the micro-batch, each sequence, or the optimizer step's global batch
    router_aux_loss_scope: str = bounded("micro_batch", choices=AUX_LOSS_SCOPES)
    # DeepSeek-V3 aux-loss-free balancing: per-expert selection bias step per update (0 = off;
    # DeepSeek-V3 used 0.001). <= 1: the bias only orders the experts, far larger steps overflow it
    router_bias_update_rate: float = bounded(0.0, ge=0, le=1)
    # routing scores: softmax over experts (Mixtral) or per-expert sigmoid (DeepSeek-V3)
    router_score: str = bounded("softmax", choices=ROUTER_SCORES)
    # renormalise the k gate weights to sum to one; null = yes for k > 1, no at k = 1 (Switch)
    router_norm_topk: Optional[bool] = None
    # capacity factor in eval() mode (evaluation, generation)
    eval_capacity_factor: Optional[float] = bounded(None, gt=0, null="dropless at evaluation")
    # which assignments an expert over capacity keeps: earliest tokens, or first choices first (GShard)
    capacity_priority: str = bounded("token", choices=CAPACITY_PRIORITIES)
    # RMSNorm of every query and key head (weights [head_dim], one per projection) before RoPE,
    # as OLMo 2 / Qwen3: bounds the attention logits, which otherwise grow with the q/k weights
    qk_norm: bool = False
    # A scalar head `score` [1, hidden] (no bias, as Hugging Face's *ForSequenceClassification)
    # on the final hidden states beside the LM head: a reward model's reward (stage=reward) or
    # PPO's value estimate (stage=rl stage.algorithm=ppo). The stage presets switch it on.
    score_head: bool = False
    # normal: N(0, initializer_range), residual outputs (o_proj, down_proj) / sqrt(2 num_layers)
    # (GPT-2). small: std sqrt(2 / (5 hidden)) (Nguyen & Salazar 2019, "SmallInit") and residual
    # outputs 2 / (num_layers sqrt(hidden)) (GPT-NeoX's wang_init): scales with the width
    init: str = bounded("normal", choices=INITS)
    # Gemma 2 soft-capping: logits <- c tanh(logits / c), in the LM head and the chunked loss
    logit_softcap: Optional[float] = bounded(None, gt=0, null="no capping")

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.hidden_size % self.num_attention_heads == 0,
              f"model.num_attention_heads={self.num_attention_heads} must divide "
              f"model.hidden_size={self.hidden_size}")
        check(self.head_dim % 2 == 0,
              f"model.hidden_size / model.num_attention_heads = {self.head_dim} must be even "
              "(rotary embeddings rotate pairs of channels)")
        check(self.num_attention_heads % self.num_kv_heads == 0,
              f"model.num_kv_heads={self.num_kv_heads} must divide "
              f"model.num_attention_heads={self.num_attention_heads}")
        check(self.num_experts_per_token <= self.num_experts,
              f"model.num_experts_per_token={self.num_experts_per_token} must be <= "
              f"model.num_experts={self.num_experts}")
        self.moe_layer_indices()

    @property
    def normalize_topk(self) -> bool:
        """Renormalise the k gate weights? At k = 1 renormalising gives a weight of p / p = 1,
        so the LM loss sends no gradient to the router; Switch scales by the raw p instead."""
        if self.router_norm_topk is None:
            return self.num_experts_per_token > 1
        return self.router_norm_topk

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def uses_rope(self) -> bool:
        return self.position_encoding in ("rope", "rope+alibi")

    @property
    def uses_alibi(self) -> bool:
        return self.position_encoding in ("alibi", "rope+alibi")

    def moe_layer_indices(self) -> List[int]:
        """The sorted indices of the sparse (MoE) layers that `moe_layers` selects."""
        layers = self.moe_layers
        if isinstance(layers, str):
            modes = {"alternate": range(1, self.num_layers, 2), "all": range(self.num_layers), "none": []}
            check(layers in modes, f"model.moe_layers={layers!r} must be one of "
                  f"{', '.join(_MOE_LAYER_MODES)} or a list of layer indices")
            return list(modes[layers])
        indices = [int(i) for i in layers]
        check(all(0 <= i < self.num_layers for i in indices) and len(set(indices)) == len(indices),
              f"model.moe_layers={indices} must list distinct layer indices in "
              f"[0, model.num_layers={self.num_layers})")
        return sorted(indices)


def check_positions(config: H64LMConfig, length: int, what: str) -> None:
    """The one rule on sequence lengths: RoPE alone cannot go past the positions it was built for.

    `what` names the setting that produced `length` (data.seq_len, gen.max_new_tokens, ...)."""
    check(length <= config.max_position_embeddings or config.uses_alibi,
          f"{what} gives {length} positions, more than model.max_position_embeddings="
          f"{config.max_position_embeddings} with model.position_encoding=rope (RoPE alone cannot "
          f"extrapolate); lower {what}, raise model.max_position_embeddings, or use an ALiBi encoding")
