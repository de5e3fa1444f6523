"""`train.init_from`: a new run's initial weights from another run or a Hugging Face folder.

- the same model (equal `architecture`, h64lm/model/architecture.py: training-time settings such as
  balancing losses, capacity or the aux-free bias rate may differ): its weights, for continued
  pretraining with new data, optimizer or schedule (the optimizer state is NOT taken: a new run);
- a dense model when this run's model is MoE: sparse upcycling (h64lm/model/upcycle.py), every dense
  FFN copied into each expert, with `train.init_noise_std` noise;
- `hf:DIR`: a folder of a stock family (h64lm/hf/stock.py) or one exported from here
  (h64lm/hf/importer.py). As `from_pretrained` does, the run takes the folder's architecture
  (`adopt_source_architecture`); `model.*` keys on the command line win, and weights that do not
  fit the result (neither the same model nor an upcycling) fail in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from h64lm.config import RunConfig, run_config_from_yaml
from h64lm.hf import import_hf, import_hf_config
from h64lm.model import H64LMConfig
from h64lm.model.architecture import STAGE_HEADS, architecture, architecture_differences, architecture_fields
from h64lm.model.upcycle import upcycle_state_dict
from h64lm.runtime.checkpoint import CheckpointError, load_model_state, read_full_state, resolve
from h64lm.validation import ConfigError

__all__ = ["adopt_source_architecture", "initialize_from", "model_keys_set"]


def _hf_error(init_from: str, e: Exception) -> ConfigError:
    return ConfigError(f"train.init_from={init_from}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def model_keys_set(overrides: list[str]) -> Optional[set]:
    """The model fields the command line sets (`model.hidden_size=...`); None when it picks a
    model preset (`model=demo`), which sets them all."""
    keys = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0].strip()
        if key == "model":
            return None
        if key.startswith("model."):
            keys.add(key[len("model."):])
    return keys


def adopt_source_architecture(run: RunConfig, overrides: list[str],
                              log: Callable[[str], None] = lambda _: None) -> RunConfig:
    """With `train.init_from=hf:DIR`, `run` with the folder's architecture in every model field the
    command line does not set (and the folder's aux-free bias, if it routes with one and this run
    has none); any other run unchanged. Cheap: reads config.json only."""
    init_from = run.train.init_from
    if not init_from or not init_from.startswith("hf:"):
        return run
    explicit = model_keys_set(overrides)
    if explicit is None:
        return run  # a preset names the architecture; initialize_from compares
    try:
        src = import_hf_config(init_from[3:])
    except (OSError, ValueError) as e:
        raise _hf_error(init_from, e) from None
    taken = {k: getattr(src, k) for k in architecture_fields()
             if k not in explicit and getattr(src, k) != getattr(run.model, k)}
    if src.router_bias_update_rate and not run.model.router_bias_update_rate and \
            "router_bias_update_rate" not in explicit:
        taken["router_bias_update_rate"] = src.router_bias_update_rate
    if not taken:
        return run
    try:
        model = dataclasses.replace(run.model, **taken)
    except ValueError as e:  # the folder's settings combined with the command line's
        raise _hf_error(init_from, e) from None
    log(f"train.init_from: the model of {init_from} (" + ", ".join(f"model.{k}={v}" for k, v in taken.items())
        + ")")
    return dataclasses.replace(run, model=model)


def _source(init_from: str) -> tuple[H64LMConfig, dict]:
    if init_from.startswith("hf:"):
        try:
            return import_hf(init_from[3:])
        except (OSError, ValueError) as e:
            raise _hf_error(init_from, e) from None
    try:
        state = read_full_state(resolve(init_from))
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={init_from}: {e}") from None
    return run_config_from_yaml(state["config"]).model, state["model"]


def _with_router_bias(model: nn.Module, state: dict, init_from: str) -> dict:
    """The aux-free selection bias is a buffer only runs with `model.router_bias_update_rate>0`
    have: this run without one starts it at zero; a source's non-zero bias is part of how it routes,
    so it is never dropped silently."""
    own = {k: v for k, v in model.state_dict().items() if k.endswith("router.bias")}
    state = {k: v for k, v in state.items() if not (k.endswith("router.bias") and k not in own and not v.any())}
    extra = [k for k in state if k.endswith("router.bias") and k not in own]
    if extra:
        raise ConfigError(f"train.init_from={init_from}: its routers select with a non-zero aux-free bias "
                          f"({extra[0]}); set model.router_bias_update_rate>0 (e.g. 0.001) to keep it")
    return {**{k: torch.zeros_like(v) for k, v in own.items()}, **state}


def _with_stage_heads(model: nn.Module, state: dict, init_from: str, log: Callable[[str], None]) -> dict:
    """The scalar head (`model.score_head`) follows this run's stage, not the source: a reward model
    or PPO value head starts from this run's own initialisation when the source has none, and a
    source's head is left out when this run has none (a policy from a reward model)."""
    own = model.state_dict()
    if "score.weight" in own and "score.weight" not in state:
        log(f"train.init_from: {init_from} has no scalar head; model.score_head starts from its initialisation")
        return {**state, "score.weight": own["score.weight"]}
    if "score.weight" not in own and "score.weight" in state:
        log(f"train.init_from: the scalar head of {init_from} is left out (model.score_head=false)")
        return {k: v for k, v in state.items() if k != "score.weight"}
    return state


def _load(model: nn.Module, state: dict, init_from: str) -> None:
    try:
        load_model_state(model, _with_router_bias(model, state, init_from))
    except CheckpointError as e:
        raise ConfigError(f"train.init_from={init_from}: {e}") from None


def _trunk(c: H64LMConfig) -> dict:
    return {k: v for k, v in architecture(c).items() if k not in STAGE_HEADS}


def initialize_from(model: nn.Module, init_from: str, noise_std: float, seed: int,
                    log: Callable[[str], None]) -> None:
    config: H64LMConfig = model.config
    src_cfg, state = _source(init_from)
    state = _with_stage_heads(model, state, init_from, log)
    differing = architecture_differences(_trunk(src_cfg), _trunk(config))
    if not differing:
        _load(model, state, init_from)
        log(f"train.init_from: weights of {init_from} (the same model; optimizer and schedule start fresh)")
        return
    if not src_cfg.moe_layer_indices() and config.moe_layer_indices():
        try:
            state = upcycle_state_dict(state, src_cfg, config, noise_std=noise_std, seed=seed)
        except ValueError as e:
            raise ConfigError(f"train.init_from={init_from}: {e}") from None
        _load(model, state, init_from)
        log(f"train.init_from: upcycled the dense model of {init_from} into {len(config.moe_layer_indices())} "
            f"MoE layers of {config.num_experts} experts (noise std {noise_std})")
        return
    raise ConfigError(
        f"train.init_from={init_from}: its model differs in " + ", ".join(differing[:6])
        + "; use the same model, or a dense model to upcycle into this MoE model")
