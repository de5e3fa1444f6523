"""Mixed precision, applied around the model from outside: autocast context and gradient scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from h64lm.config import ConfigError

__all__ = ["Precision", "resolve_precision"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str
    # False where FSDP's MixedPrecisionPolicy computes in `dtype` itself (h64lm/train/sharded.py)
    autocast_enabled: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32" or not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if use_bf16 else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("hardware.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    return Precision(name=name, device_type=device.type)
