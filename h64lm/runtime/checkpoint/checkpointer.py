"""The trainer's checkpointer: one layout at every world size and strategy (one process included).

Every method is collective (every rank calls it). A background save (`train.async_save`) stages
the state in host memory and returns; the shards are written, hashed, listed in the manifest and
renamed into place by a worker thread whose collectives all run on a gloo group made once for
checkpoints, so they never interleave with the training step's collectives (with one shared
group, 2-process FSDP aborted in a collective mismatch and DDP+EP hung until the timeout).
`wait()` joins it; nothing else is written while a save is in flight.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import CheckpointError, os_error_line
from .layout import BEST, fsync_dir, prune, step_name, write_last_pointer
from .store import begin_save, finish_save, load_into, shard_error, state_of, write_shards
from .trust import verify
from .weights import save_consolidated

__all__ = ["Checkpointer"]

BEST_WEIGHTS = "best_model.safetensors"


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, async_save: bool, log: Callable[[str], None] = print):
        self.run_dir, self.dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.keep_last, self.async_save, self.log = keep_last, async_save, log
        self._group: Optional[dist.ProcessGroup] = None
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _pg(self) -> Optional[dist.ProcessGroup]:
        """The checkpoints' own gloo group (collective to create, so made on first use, which is
        itself collective)."""
        if self._distributed() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, extras: dict[str, Any], step: int,
             *, final: bool) -> Path:
        """Write `checkpoints/step_NNNNNNN/`; unless `final`, in the background with
        `train.async_save` on several processes (then it appears at the next save or `wait()`)."""
        self.wait()
        path = self.dir / step_name(step)
        background = self.async_save and not final and self._distributed()
        self._write(model, optimizer, extras, path, background, replace=False)
        return path

    def _write(self, model, optimizer, extras, path: Path, background: bool, replace: bool) -> None:
        group, tmp = self._pg(), path.with_name(f".{path.name}.tmp")
        info = {"step": int(extras.get("step", -1))}
        with self._cleanup_on_error(tmp):
            begin_save(tmp, extras, group)
            upload = write_shards(state_of(model, optimizer), tmp, group, background)
            if upload is None:
                self._finish(None, tmp, path, info, replace)
                return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="h64lm-checkpoint")
        self._pending = self._worker.submit(self._finish, upload, tmp, path, info, replace)

    @contextlib.contextmanager
    def _cleanup_on_error(self, tmp: Path):
        """A failed save (a full disk) gives its space back; the earlier checkpoints are untouched."""
        try:
            yield
        except CheckpointError:
            if self._is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _finish(self, upload: Optional[Future], tmp: Path, path: Path, info: dict, replace: bool) -> None:
        with self._cleanup_on_error(tmp):
            if upload is not None:
                try:
                    upload.result()
                except Exception as e:
                    raise shard_error(e, tmp) from None
            finish_save(tmp, path, info, self._group, replace)
        if self._is_main() and path.name != BEST:
            try:
                write_last_pointer(self.dir, path.name)
                prune(self.dir, self.keep_last)
            except OSError as e:  # the checkpoint itself is complete and listed
                self.log(f"warning: {os_error_line('update the last pointer in', self.dir, e)}")

    def wait(self) -> None:
        """Finish the save in flight (on every rank): in place, `last` names it, old ones pruned."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def save_best(self, model: nn.Module, optimizer: torch.optim.Optimizer, extras: dict[str, Any],
                  step: int) -> None:
        """`best/` (hard links to this step's directory when it was saved and verifies, else a new
        save) and `best_model.safetensors`."""
        self.wait()
        best, source = self.dir / BEST, self.dir / step_name(step)
        error = None
        if self._is_main():
            try:
                verify(source)
                self._link_tree(source, best)
            except CheckpointError:
                error = "unsaved"
            except OSError as e:
                error = os_error_line("save checkpoint", best, e)
        errors = [error]
        if self._distributed():
            dist.broadcast_object_list(errors, src=0, group=self._pg())
        if errors[0] == "unsaved":
            self._write(model, optimizer, extras, best, background=False, replace=True)
        elif errors[0]:
            raise CheckpointError(errors[0])
        try:
            save_consolidated(model, self.run_dir / BEST_WEIGHTS)
        except OSError as e:
            raise CheckpointError(os_error_line("save", self.run_dir / BEST_WEIGHTS, e)) from None

    def _link_tree(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=os.link)
        old = dst.with_name(f".{dst.name}.old.tmp")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.dir)

    def load(self, path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
        """Verify, then fill `model` / `optimizer` in place, whatever layout wrote `path` (legacy
        `.pt` files included) -> this rank's extras."""
        self.wait()
        return load_into(Path(path), model, optimizer, self._pg())

    def _is_main(self) -> bool:
        return not self._distributed() or dist.get_rank() == 0
