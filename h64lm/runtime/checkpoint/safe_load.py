"""Reading DCP checkpoints without running code from the files.

torch 2.13's `FileSystemReader.read_metadata` calls `pickle.load` on `.metadata`, and
`DefaultLoadPlanner.load_bytes` calls `torch.load(weights_only=False)` on every non-tensor value
(optimizer hyperparameters): a crafted checkpoint runs code at load, checksum or not (a copied
checkpoint comes with its own manifest). Here the metadata goes through an unpickler that only
builds DCP's metadata dataclasses, torch sizes/dtypes/layouts and paths, and byte values through
`weights_only=True`.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import CheckpointError

__all__ = ["SafeReader", "SafeLoadPlanner", "SafeFullLoadPlanner", "load_metadata"]

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}
_MODULES = {"torch.distributed.checkpoint.metadata": dcp_meta, "torch.distributed.checkpoint.filesystem": dcp_fs,
            "torch.serialization": torch.serialization, "torch": torch, "pathlib": pathlib,
            "collections": collections}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return getattr(_MODULES[module], name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def load_metadata(data: bytes, where: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any malformed pickle: one line, never a traceback
        raise CheckpointError(f"refused {where}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
                              " (only DCP's metadata classes may be unpickled)") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"refused {where}: it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata cannot name arbitrary callables."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _safe_bytes(value: io.BytesIO):
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused a checkpoint value that is not plain data ({str(e).splitlines()[0][:160]})") \
            from None


def _set_loaded(planner: DefaultLoadPlanner, read_item, value: io.BytesIO) -> None:
    obj = _safe_bytes(value)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads into the caller's state dict; non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        _set_loaded(self, read_item, value)


class SafeFullLoadPlanner(_EmptyStateDictLoadPlanner):
    """Loads every value of a checkpoint into an empty dict (no model needed); same safety."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        _set_loaded(self, read_item, value)
