"""lm-eval's HFLM without the `accelerate` package (which requirements.txt does not list).

HFLM imports accelerate at module level but, for one process on one device with a fixed batch
size, only asks an `Accelerator` for its process count and device type. When accelerate is
missing, a stand-in answering just that is put in sys.modules while HFLM is imported and built,
then removed, so nothing else sees it. With accelerate installed the real one is used.
"""

import importlib.util
import sys
import types
from contextlib import contextmanager

import torch

__all__ = ["hflm_available_accelerate"]


class _Accelerator:
    num_processes = 1
    process_index = 0
    local_process_index = 0

    def __init__(self, **kwargs):
        self.device = torch.device("cpu")


def _unavailable(*args, **kwargs):
    raise RuntimeError("the accelerate stand-in supports one CPU process with a fixed batch size")


@contextmanager
def hflm_available_accelerate():
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    fake = types.ModuleType("accelerate")
    fake.Accelerator = _Accelerator
    fake.InitProcessGroupKwargs = lambda **kwargs: None
    fake.find_executable_batch_size = _unavailable
    fake.utils = types.ModuleType("accelerate.utils")
    fake.utils.get_max_memory = _unavailable
    sys.modules.update({"accelerate": fake, "accelerate.utils": fake.utils})
    try:
        yield
    finally:
        del sys.modules["accelerate"], sys.modules["accelerate.utils"]
