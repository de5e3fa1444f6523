"""`train.init_from`: a new run's initial weights from another run or a Hugging Face folder.

- the same model (every architecture key equal): its weights, for continued pretraining with new
  data, optimizer or schedule (the optimizer state is NOT taken: this is a new run);
- a dense model when this run's model is MoE: sparse upcycling (h64lm/model/upcycle.py), every dense
  FFN copied into each expert, with `train.init_noise_std` noise;
- `hf:DIR`: a Mixtral / Llama / Mistral folder or one exported from here (h64lm/hf/importer.py),
  then either of the above.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import OmegaConf
from torch import nn

from h64lm.config import run_config_from_yaml
from h64lm.model import H64LMConfig
from h64lm.model.upcycle import upcycle_state_dict
from h64lm.train.checkpoint import CheckpointError, load_model_state, load_trusted, resolve_checkpoint_path
from h64lm.validation import ConfigError

__all__ = ["initialize_from"]

# Keys that change what a model computes but not its weights' shapes or meaning.
_FREE = {"gradient_checkpointing", "router_aux_loss_coef", "router_z_loss_coef", "router_aux_loss_scope",
         "capacity_factor", "eval_capacity_factor", "capacity_priority", "dropout", "router_bias_update_rate"}


def _source(init_from: str) -> tuple[H64LMConfig, dict]:
    if init_from.startswith("hf:"):
        from h64lm.hf import import_hf

        try:
            return import_hf(init_from[3:])
        except (OSError, ValueError) as e:
            raise ConfigError(f"train.init_from={init_from}: {str(e).splitlines()[0]}") from None
    try:
        state = load_trusted(resolve_checkpoint_path(init_from))
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={init_from}: {e}") from None
    return run_config_from_yaml(state["config"]).model, state["model"]


def initialize_from(model: nn.Module, init_from: str, noise_std: float, seed: int,
                    log: Callable[[str], None]) -> None:
    config: H64LMConfig = model.config
    src_cfg, state = _source(init_from)
    src, cur = OmegaConf.structured(src_cfg), OmegaConf.structured(config)
    differing = sorted(k for k in cur if k not in _FREE and src[k] != cur[k])
    if not differing:
        load_model_state(model, state)
        log(f"train.init_from: weights of {init_from} (the same model; optimizer and schedule start fresh)")
        return
    if not src_cfg.moe_layer_indices() and config.moe_layer_indices():
        try:
            state = upcycle_state_dict(state, src_cfg, config, noise_std=noise_std, seed=seed)
        except ValueError as e:
            raise ConfigError(f"train.init_from={init_from}: {e}") from None
        load_model_state(model, state)
        log(f"train.init_from: upcycled the dense model of {init_from} into {len(config.moe_layer_indices())} "
            f"MoE layers of {config.num_experts} experts (noise std {noise_std})")
        return
    raise ConfigError(
        f"train.init_from={init_from}: its model differs in "
        + ", ".join(f"model.{k} ({src[k]} -> {cur[k]})" for k in differing[:6])
        + "; use the same model, or a dense model to upcycle into this MoE model")
