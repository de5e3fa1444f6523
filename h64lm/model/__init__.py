"""The H64LM model: a pure nn.Module package (no distributed, precision or logging code)."""

from .cache import KVCache
from .config import H64LMConfig
from .flops import active_parameters_per_token, count_parameters, flops_per_token
from .generate import generate, left_pad
from .model import CausalLMOutput, H64LMForCausalLM

__all__ = [
    "CausalLMOutput",
    "H64LMConfig",
    "H64LMForCausalLM",
    "KVCache",
    "active_parameters_per_token",
    "count_parameters",
    "flops_per_token",
    "generate",
    "left_pad",
]
