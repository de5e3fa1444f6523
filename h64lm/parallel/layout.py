"""The run's parallel layout, validated once: who holds which weights.

Every run, one process included, is described by one `ParallelLayout` (world size, strategy, ep)
and built through the same parallel layer (h64lm/parallel/setup.py); the trainer and the planner
both validate a layout here, so a bad `hardware.*` value gets the same one-line error everywhere
and before any data, model or process-group work.
"""

from __future__ import annotations

from dataclasses import dataclass

from h64lm.validation import ConfigError

__all__ = ["ParallelLayout", "STRATEGIES"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int  # processes (GPUs)
    strategy: str = "ddp"  # how non-expert weights are data-parallel: replicated (ddp) or sharded (fsdp)
    ep: int = 1  # expert-parallel degree: ranks that split the experts between them
    num_experts: int = 1  # model.num_experts (ep must divide it)
    has_moe: bool = True  # whether the model has MoE layers (ep > 1 needs some)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"hardware.strategy={self.strategy!r} must be one of {', '.join(STRATEGIES)}")
        if self.world_size < 1 or self.ep < 1:
            raise ConfigError(f"the world size ({self.world_size}) and hardware.ep={self.ep} must be >= 1")
        if self.world_size % self.ep:
            raise ConfigError(f"hardware.ep={self.ep} must divide the world size {self.world_size}; "
                              "change hardware.ep or the number of processes")
        if self.num_experts % self.ep:
            raise ConfigError(f"hardware.ep={self.ep} must divide model.num_experts={self.num_experts}; "
                              "change hardware.ep or model.num_experts")
        if self.ep > 1 and not self.has_moe:
            raise ConfigError(f"hardware.ep={self.ep} needs MoE layers, but the model is dense "
                              "(model.moe_layers); use hardware.ep=1")

    @classmethod
    def from_run(cls, run, world_size: int) -> "ParallelLayout":
        """The layout a `RunConfig` asks for at `world_size` processes."""
        return cls(world_size, run.hardware.strategy, run.hardware.ep, run.model.num_experts,
                   bool(run.model.moe_layer_indices()))

    @property
    def edp(self) -> int:
        """Ranks holding the same experts (expert weights are data-parallel over them)."""
        return self.world_size // self.ep

    @property
    def sharded(self) -> bool:
        """Whether weights are DTensors split over ranks (FSDP and/or expert parallelism)."""
        return self.world_size > 1 and (self.strategy == "fsdp" or self.ep > 1)
