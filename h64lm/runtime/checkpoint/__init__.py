"""Checkpoints: one checkpointer and one on-disk layout for every world size and strategy.

- `Checkpointer` (checkpointer.py): what the trainer calls (save / save_best / wait / load).
- layout.py: names in `RUN/checkpoints/` and the `last` pointer; store.py: one DCP directory;
  manifest.py: size + SHA-256 of every file, checked before anything is read; safe_load.py:
  DCP's pickled metadata and values read without running code; trust.py: which checkpoint to
  trust; legacy.py: the `.pt` files and DCP directories of the earlier layouts; weights.py:
  loading a state dict and `best_model.safetensors`; sharded.py: a model (+ optimizer) saved and
  loaded outside the trainer (the parallel tests' harness); `python -m h64lm.runtime.checkpoint`:
  verify / upgrade from the command line.
"""

from .checkpointer import BEST_WEIGHTS, Checkpointer
from .errors import CheckpointError
from .layout import remove_entry, step_entries, step_name
from .legacy import FORMAT_VERSION
from .manifest import MANIFEST
from .store import load_into, load_trained_model, read_extras, read_full_state
from .trust import find_newest, is_checkpoint, resolve, verify
from .weights import consolidated_state_dict, load_model_state, save_consolidated

__all__ = ["Checkpointer", "CheckpointError", "FORMAT_VERSION", "MANIFEST", "BEST_WEIGHTS", "verify",
           "find_newest", "resolve", "is_checkpoint", "load_into", "load_trained_model", "read_extras", "read_full_state",
           "load_model_state", "save_consolidated", "consolidated_state_dict", "step_entries",
           "step_name", "remove_entry"]
