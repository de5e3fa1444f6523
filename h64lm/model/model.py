"""H64LMForCausalLM: embeddings, pre-norm blocks (dense or MoE), final RMSNorm, LM head."""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .alibi import alibi_slopes
from .block import Block
from .cache import KVCache
from .config import H64LMConfig, check_positions
from .dtypes import compute_dtype
from .generate import generate
from .head_logprobs import hidden_token_logprobs
from .loss import IGNORE_INDEX, chunked_cross_entropy, softcap
from .mask import attention_bias, document_positions
from .norm import RMSNorm
from .rope import RotaryEmbedding

__all__ = ["H64LMForCausalLM", "CausalLMOutput", "init_stds"]


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor] = None  # [B, T, V]; None when return_logits=False
    # Mean token cross-entropy of the labels; None without labels. No composed loss: the objective
    # (h64lm/objectives/lm.py) weighs ce, aux and z. CE is computed here, not by the objective,
    # because under FSDP2 the LM-head weight is gathered only inside forward (chunked CE).
    ce: Optional[torch.Tensor] = None
    aux: Optional[torch.Tensor] = None  # mean over MoE layers of the Switch loss (no coefficient)
    z: Optional[torch.Tensor] = None  # mean over MoE layers of the router z-loss (no coefficient)
    # per MoE layer: {"layer": index, "load": [E] assignment fractions, "counts": [E] routed
    # assignments (before any capacity cut), "dropped": fraction}
    router: List[Dict[str, Any]] = field(default_factory=list)
    past_key_values: Optional[KVCache] = None
    # [B, T] fp32 log p(labels[b, t]) (0 where ignored), with token_logprobs=True: policy and
    # preference objectives read these instead of a loss
    token_logprobs: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # [B, T] fp32 scalar head at every position (score_head)


def init_stds(config: H64LMConfig) -> Tuple[float, float]:
    """(std of every matrix, std of the residual output projections) for `config.init`."""
    if config.init == "small":  # GPT-NeoX small_init / wang_init
        return math.sqrt(2 / (5 * config.hidden_size)), 2 / (config.num_layers * math.sqrt(config.hidden_size))
    return config.initializer_range, config.initializer_range / math.sqrt(2 * config.num_layers)


class H64LMForCausalLM(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        self.config = config
        sparse = set(config.moe_layer_indices())
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, i in sparse) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.score = nn.Linear(config.hidden_size, 1, bias=False) if config.score_head else None
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta,
                                       config.max_position_embeddings)
                       if config.uses_rope else None)
        if config.uses_alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads),
                                 persistent=False)
        else:
            self.alibi_slopes = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """init=normal: N(0, initializer_range) for every matrix; residual output projections
        (o_proj, down_proj) scaled by 1/sqrt(2 * num_layers) as in GPT-2, so the residual stream's
        variance does not grow with depth. init=small: see `init_stds`. Norm weights stay at one;
        there are no biases."""
        std, out_std = init_stds(self.config)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            is_output = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
            nn.init.normal_(param, mean=0.0, std=out_std if is_output else std)

    def _attention_inputs(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
        cache: Optional[KVCache], dtype: torch.dtype,
        document_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor], bool]:
        """-> (rotary cos/sin, additive bias or None, is_causal) shared by every layer."""
        cfg = self.config
        if document_ids is not None:
            return self._document_inputs(input_ids, attention_mask, cache, dtype, document_ids)
        T = input_ids.shape[1]
        seen, stored = (cache.seen, cache.length) if cache is not None else (0, 0)
        end = seen + T
        check_positions(cfg, end, "the input (cached + new tokens)")
        device = input_ids.device
        key_padding = None
        if attention_mask is not None:
            if attention_mask.shape != (input_ids.shape[0], end):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(input_ids.shape[0], end)} (cached + new tokens)")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # [B, T]
            if not bool(attention_mask.all()):
                key_padding = attention_mask[:, end - stored - T:].bool()  # [B, L]
        else:
            positions = torch.arange(seen, end, device=device)[None]  # [1, T]
        rotary = self.rotary(positions, end) if self.rotary is not None else None

        window = cfg.sliding_window
        need_bias = (self.alibi_slopes is not None or key_padding is not None
                     or (window is not None and stored + T > window))
        if not need_bias and (stored == 0 or T == 1):
            return rotary, None, stored == 0 and T > 1
        q_slots = torch.arange(seen, end, device=device)
        k_slots = torch.arange(seen - stored, end, device=device)
        bias = attention_bias(q_slots, k_slots, key_padding, window, self.alibi_slopes, dtype)
        return rotary, bias, False

    def _document_inputs(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
        cache: Optional[KVCache], dtype: torch.dtype, document_ids: torch.Tensor,
    ) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, bool]:
        """Packed rows: attention stays inside each document and positions restart per document."""
        if document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected "
                             f"{tuple(input_ids.shape)} (the shape of input_ids)")
        if cache is not None or attention_mask is not None:
            raise ValueError("document_ids is for packed training rows: it cannot be combined "
                             "with attention_mask, past_key_values or use_cache")
        T = input_ids.shape[1]
        check_positions(self.config, T, "the packed row")
        positions = document_positions(document_ids)  # [B, T]
        rotary = self.rotary(positions, T) if self.rotary is not None else None
        slots = torch.arange(T, device=input_ids.device)
        bias = attention_bias(slots, slots, None, self.config.sliding_window, self.alibi_slopes,
                              dtype, document_ids)
        return rotary, bias, False

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        return_logits: bool = True,
        router_stats: bool = True,
        *,
        document_ids: Optional[torch.Tensor] = None,
        token_logprobs: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] already aligned (labels[b, t] is the target of
        position t, -100 ignored); attention_mask [B, cached + T] (1 = token, 0 = left padding).
        router_stats=False skips the router losses and loads (aux, z = 0, router = []): for
        decoding, where they cost a dozen small ops per MoE layer per token and nobody reads
        them; it cannot be combined with labels. document_ids [B, T] marks packed documents:
        attention never crosses a change of id and positions restart at each one.
        token_logprobs=True (with labels): `out.token_logprobs` [B, T] instead of `out.ce`,
        from the hidden states without [B, T, V] logits."""
        if token_logprobs and labels is None:
            raise ValueError("token_logprobs=True needs labels: the log-probabilities are of the labels")
        if labels is not None and not router_stats:
            raise ValueError("router_stats=False drops the router terms the objective adds to the loss: "
                             "pass labels only with router_stats=True")
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config.num_layers, self.config.sliding_window)
        h = self.embed_tokens(input_ids)  # [B, T, hidden]
        dtype = compute_dtype(h)
        rotary, bias, is_causal = self._attention_inputs(input_ids, attention_mask, cache, dtype,
                                                         document_ids)

        stats = []
        for i, layer in enumerate(self.layers):
            h, layer_stats = layer(h, rotary, bias, is_causal, cache, router_stats)
            if layer_stats is not None:
                stats.append((i, layer_stats))
        if cache is not None:
            cache.advance(input_ids.shape[1])
        h = self.norm(h)

        out = CausalLMOutput(past_key_values=cache if use_cache else None)
        zero = h.new_zeros((), dtype=torch.float32)
        out.aux = torch.stack([s["aux"] for _, s in stats]).mean() if stats else zero
        out.z = torch.stack([s["z"] for _, s in stats]).mean() if stats else zero
        out.router = [{"layer": i, "load": s["load"], "counts": s["counts"],
                       "dropped": s["dropped"]} for i, s in stats]
        if self.score is not None:
            out.scores = self.score(h).squeeze(-1).float()  # [B, T]
        if return_logits:
            out.logits = softcap(self.lm_head(h), self.config.logit_softcap)
        if token_logprobs:
            out.token_logprobs = hidden_token_logprobs(h, self.lm_head.weight, labels, self.config.logit_softcap)
        elif labels is not None:
            if out.logits is not None:
                # sum / max(count, 1): a batch whose labels are all ignored gives 0 with zero
                # gradient (as the chunked path does), not the NaN of 0/0 from reduction="mean"
                count = (labels != IGNORE_INDEX).sum().clamp(min=1)
                out.ce = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                         ignore_index=IGNORE_INDEX, reduction="sum") / count
            else:
                out.ce = chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight,
                                               labels.flatten(), softcap=self.config.logit_softcap)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Sample a continuation; see `h64lm.model.generate.generate` for the arguments."""
        return generate(self, input_ids, max_new_tokens, **kwargs)
