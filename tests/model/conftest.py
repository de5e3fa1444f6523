import pytest
import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

SMALL = dict(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
             intermediate_size=96, moe_intermediate_size=48, num_experts=4,
             num_experts_per_token=2, max_position_embeddings=64)


def build(seed: int = 0, **overrides) -> H64LMForCausalLM:
    torch.manual_seed(seed)
    return H64LMForCausalLM(H64LMConfig(**{**SMALL, **overrides})).eval()


@pytest.fixture
def small_model():
    """A factory: small_model(**config overrides) -> eval-mode model with seeded weights."""
    return build
