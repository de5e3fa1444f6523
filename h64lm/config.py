"""Config schemas of one run and their registration in Hydra's ConfigStore.

Each config group (`conf/<group>/*.yaml`) lists its schema first in its defaults list
(`base_model`, `base_data`, `base_optim`, `base_hardware`, `base_logger`), so a typo such as
`model.hiden_size=1` fails when Hydra composes. `+group.key=...` overrides bypass that check;
`to_dataclass` catches them before any expensive work starts.

Where each key is consumed:
  model.*     h64lm/model/config.py (H64LMConfig)      data.*   h64lm/data/config.py (DataConfig)
  train.*     h64lm/train/loop.py                      optim.*  h64lm/train/optim.py
  hardware.*  h64lm/train/distributed.py, precision.py logger.* h64lm/train/wandb_sink.py
  gen.*, prompt, checkpoint, mode: h64lm/cli.py
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from h64lm.data.config import DataConfig
from h64lm.model.config import H64LMConfig

__all__ = [
    "TrainConfig",
    "OptimConfig",
    "HardwareConfig",
    "LoggerConfig",
    "GenConfig",
    "RunConfig",
    "register_configs",
    "to_dataclass",
    "ConfigError",
    "validate_run",
]

MODES = ("train", "eval", "generate")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key to change."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 8  # per-device micro-batch, in sequences
    grad_accum: int = 1
    # Sequences per optimizer step over all ranks. null: batch_size x grad_accum x world size;
    # set: grad_accum is derived from it and must divide evenly (validate_run).
    global_batch_size: Optional[int] = None
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2  # step checkpoints kept besides best.pt
    log_every: int = 1
    seed: int = 1234
    resume: Optional[str] = None  # null | auto | a checkpoint file | a run directory
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    val_batch_size: Optional[int] = None  # defaults to batch_size
    extra_eval_seq_lens: List[int] = field(default_factory=list)  # also validate at these lengths
    sample_prompts: List[str] = field(
        default_factory=lambda: ["The history of", "In 1998, the", "The city is known for"]
    )
    sample_tokens: int = 32

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every",
                    "log_every", "keep_last", "max_bad_steps"):
            _check(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)} must be >= 1")
        _check(self.global_batch_size is None or self.global_batch_size >= 1,
               f"train.global_batch_size={self.global_batch_size} must be >= 1 or null")
        _check(self.sample_tokens >= 0, f"train.sample_tokens={self.sample_tokens} must be >= 0")
        _check(all(n >= 1 for n in self.extra_eval_seq_lens),
               f"train.extra_eval_seq_lens={self.extra_eval_seq_lens} must hold lengths >= 1")


SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    weight_decay: float = 0.1  # matrices only: not norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 30
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        _check(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r} must be one of {SCHEDULES}")
        _check(0 < self.decay_fraction <= 1, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    compile: bool = False  # torch.compile the model (applied from outside the model code)
    distributed: bool = False  # require a torchrun launch (hardware=ddp)
    backend: Optional[str] = None  # null: nccl on cuda, gloo on cpu
    timeout_s: int = 300  # collective timeout: a dead peer ends the job instead of hanging it
    num_threads: Optional[int] = None  # torch intra-op threads on cpu
    peak_tflops: Optional[float] = None  # for MFU; null: a table for known GPUs, measured on cpu

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, f"hardware.device={self.device!r} must be one of {DEVICES}")
        _check(self.precision in PRECISIONS,
               f"hardware.precision={self.precision!r} must be one of {PRECISIONS}")
        _check(self.backend in (None, "nccl", "gloo"),
               f"hardware.backend={self.backend!r} must be null, 'nccl' or 'gloo'")
        _check(self.timeout_s >= 1, f"hardware.timeout_s={self.timeout_s} must be >= 1")


LOGGER_MODES = ("auto", "offline", "online", "disabled")


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline
    project: str = "h64lm"
    entity: Optional[str] = None
    group: Optional[str] = None  # null: the experiment name, else the sweep directory's name
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.name in ("wandb", "none"), f"logger.name={self.name!r} must be 'wandb' or 'none'")
        _check(self.mode in LOGGER_MODES, f"logger.mode={self.mode!r} must be one of {LOGGER_MODES}")


@dataclass
class GenConfig:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = 50
    top_p: Optional[float] = 0.95
    repetition_penalty: float = 1.1
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"gen.max_new_tokens={self.max_new_tokens} must be >= 1")
        _check(self.temperature >= 0, f"gen.temperature={self.temperature} must be >= 0")
        _check(self.top_k is None or self.top_k >= 1, f"gen.top_k={self.top_k} must be >= 1 or null")
        _check(self.top_p is None or 0 < self.top_p <= 1, f"gen.top_p={self.top_p} must be in (0, 1]")
        _check(self.repetition_penalty > 0,
               f"gen.repetition_penalty={self.repetition_penalty} must be > 0")
        _check(self.num_samples >= 1, f"gen.num_samples={self.num_samples} must be >= 1")


@dataclass
class RunConfig:
    mode: str = "train"  # train | eval | generate
    checkpoint: Optional[str] = None  # eval/generate: a checkpoint file or a run directory
    prompt: Optional[str] = None  # generate: the prompt (null: train.sample_prompts)
    experiment_name: Optional[str] = None  # set by experiment presets; the W&B group
    model: H64LMConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    gen: GenConfig = field(default_factory=GenConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="model", name="base_model", node=H64LMConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)


T = TypeVar("T")


def to_dataclass(node: Any, cls: type[T], prefix: str) -> T:
    """Build a schema dataclass from a config node, rejecting keys the schema lacks.

    This also catches `+model.typo=1`, which Hydra lets through a structured config.
    Validation in the dataclass's `__post_init__` raises with the key's full name.
    """
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
            f"valid keys of {prefix}: {', '.join(sorted(names))}"
        )
    return cls(**values)


def _with_global_batch(train: TrainConfig, world_size: int) -> TrainConfig:
    """`train.global_batch_size` split over the ranks and micro-batches, or an error."""
    if train.global_batch_size is None:
        return train
    per_micro_step = train.batch_size * world_size
    _check(train.global_batch_size % per_micro_step == 0,
           f"train.global_batch_size={train.global_batch_size} is not a multiple of "
           f"train.batch_size={train.batch_size} x {world_size} process(es) = {per_micro_step}; "
           "change train.global_batch_size or train.batch_size")
    accum = train.global_batch_size // per_micro_step
    _check(train.grad_accum in (1, accum),
           f"train.grad_accum={train.grad_accum} contradicts train.global_batch_size="
           f"{train.global_batch_size} ({accum} micro-steps); leave train.grad_accum=1")
    return dataclasses.replace(train, grad_accum=accum)


def validate_run(cfg: DictConfig) -> dict[str, Any]:
    """Turn a composed config into typed, validated parts, before anything expensive runs."""
    _check(cfg.mode in MODES, f"mode={cfg.mode!r} must be one of {MODES}")
    parts = {
        "model": to_dataclass(cfg.model, H64LMConfig, "model"),
        "data": to_dataclass(cfg.data, DataConfig, "data"),
        "optim": to_dataclass(cfg.optim, OptimConfig, "optim"),
        "hardware": to_dataclass(cfg.hardware, HardwareConfig, "hardware"),
        "logger": to_dataclass(cfg.logger, LoggerConfig, "logger"),
        "train": to_dataclass(cfg.train, TrainConfig, "train"),
        "gen": to_dataclass(cfg.gen, GenConfig, "gen"),
    }
    model, data = parts["model"], parts["data"]
    if cfg.mode == "train":
        for key, length in [("data.seq_len", data.seq_len)] + [
            ("train.extra_eval_seq_lens", n) for n in parts["train"].extra_eval_seq_lens
        ]:
            _check(
                length <= model.max_position_embeddings or "alibi" in model.position_encoding,
                f"{key}={length} exceeds model.max_position_embeddings="
                f"{model.max_position_embeddings} with position_encoding={model.position_encoding!r}; "
                f"lower {key}, raise model.max_position_embeddings, or use an ALiBi encoding",
            )
        parts["train"] = _with_global_batch(parts["train"], int(os.environ.get("WORLD_SIZE", "1")))
        if model.sliding_window is not None and model.sliding_window >= data.seq_len:
            warnings.warn(
                f"model.sliding_window={model.sliding_window} >= data.seq_len={data.seq_len}: the "
                "window masks nothing during training (the original H64LM's 2048 vs 1024 mistake)",
                stacklevel=2,
            )
    if cfg.mode in ("eval", "generate"):
        _check(cfg.checkpoint is not None,
               f"mode={cfg.mode} needs checkpoint=PATH (a checkpoint file or a run directory)")
    return parts
