"""H64LMConfig: the model's hyperparameters, also the schema of the Hydra `model` config group.

Only types that OmegaConf structured configs accept are used, so the coordinator can register this
class in Hydra's ConfigStore as `base_model` and a typo such as `model.hiden_size=1` is rejected.
"""

import math
from dataclasses import dataclass
from typing import Any, List, Optional

__all__ = ["H64LMConfig", "POSITION_ENCODINGS", "AUX_LOSS_SCOPES", "ROUTER_SCORES",
           "CAPACITY_PRIORITIES"]

POSITION_ENCODINGS = ("rope", "alibi", "rope+alibi")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global")
ROUTER_SCORES = ("softmax", "sigmoid")
CAPACITY_PRIORITIES = ("token", "choice")
_MOE_LAYER_MODES = ("alternate", "all", "none")


@dataclass
class H64LMConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    moe_intermediate_size: Optional[int] = None
    num_experts: int = 8
    num_experts_per_token: int = 2
    # "alternate" (odd layers sparse, as in the original), "all", "none", or a list of indices.
    # Typed Any because OmegaConf structured configs have no Union[str, List[int]].
    moe_layers: Any = "alternate"
    num_shared_experts: int = 0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    capacity_factor: Optional[float] = None
    max_position_embeddings: int = 1024
    position_encoding: str = "rope"
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    # Switch loss counts from: the micro-batch, each sequence, or the optimizer step's global batch
    router_aux_loss_scope: str = "micro_batch"
    # DeepSeek-V3 aux-loss-free balancing: per-expert selection bias step per update (0 = off)
    router_bias_update_rate: float = 0.0
    # routing scores: softmax over experts (Mixtral) or per-expert sigmoid (DeepSeek-V3)
    router_score: str = "softmax"
    # renormalise the k gate weights to sum to one; null = yes for k > 1, no at k = 1 (Switch)
    router_norm_topk: Optional[bool] = None
    # capacity factor in eval() mode (evaluation, generation); null = dropless
    eval_capacity_factor: Optional[float] = None
    # which assignments an expert over capacity keeps: earliest tokens, or first choices first
    capacity_priority: str = "token"

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                    "num_kv_heads", "intermediate_size", "num_experts", "num_experts_per_token",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size <= 0:
            raise ValueError(f"model.moe_intermediate_size={self.moe_intermediate_size} must be a "
                             "positive integer or null (= model.intermediate_size)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} must divide "
                             f"model.hidden_size={self.hidden_size}")
        if self.head_dim % 2:
            raise ValueError(f"model.hidden_size / model.num_attention_heads = {self.head_dim} "
                             "must be even (rotary embeddings rotate pairs of channels)")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_token > self.num_experts:
            raise ValueError(f"model.num_experts_per_token={self.num_experts_per_token} must be "
                             f"<= model.num_experts={self.num_experts}")
        if self.num_shared_experts < 0:
            raise ValueError(f"model.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"model.position_encoding={self.position_encoding!r} must be one of "
                             f"{', '.join(POSITION_ENCODINGS)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"model.sliding_window={self.sliding_window} must be a positive "
                             "integer or null (no window)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"model.capacity_factor={self.capacity_factor} must be > 0 or null "
                             "(dropless)")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be > 0")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"model.rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.initializer_range <= 0:
            raise ValueError(f"model.initializer_range={self.initializer_range} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0")
        self._check_routing()
        self.moe_layer_indices()

    def _check_routing(self) -> None:
        choices = (("router_aux_loss_scope", AUX_LOSS_SCOPES), ("router_score", ROUTER_SCORES),
                   ("capacity_priority", CAPACITY_PRIORITIES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be one of "
                                 f"{', '.join(allowed)}")
        rate = self.router_bias_update_rate
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"model.router_bias_update_rate={rate!r} must be a finite number "
                             ">= 0 (0 = off)")
        for name in ("capacity_factor", "eval_capacity_factor", "router_aux_loss_coef",
                     "router_z_loss_coef"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"model.{name}={value} must be finite")
        if self.eval_capacity_factor is not None and self.eval_capacity_factor <= 0:
            raise ValueError(f"model.eval_capacity_factor={self.eval_capacity_factor} must be > 0 "
                             "or null (dropless at evaluation)")
        if self.router_norm_topk not in (None, True, False):
            raise ValueError(f"model.router_norm_topk={self.router_norm_topk!r} must be true, "
                             "false or null (= true when model.num_experts_per_token > 1)")

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
            if layers == "alternate":
                return list(range(1, self.num_layers, 2))
            if layers == "all":
                return list(range(self.num_layers))
            if layers == "none":
                return []
            raise ValueError(f"model.moe_layers={layers!r} must be one of "
                             f"{', '.join(_MOE_LAYER_MODES)} or a list of layer indices")
        indices = [int(i) for i in layers]
        bad = [i for i in indices if not 0 <= i < self.num_layers]
        if bad or len(set(indices)) != len(indices):
            raise ValueError(f"model.moe_layers={indices} must list distinct layer indices in "
                             f"[0, model.num_layers={self.num_layers})")
        return sorted(indices)
