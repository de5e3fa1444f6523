"""The dtype a computation runs in: autocast's when it is on, else the tensor's own."""

import torch

__all__ = ["compute_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
