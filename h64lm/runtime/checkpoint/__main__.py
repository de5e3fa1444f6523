"""`python -m h64lm.runtime.checkpoint verify|upgrade PATH...`

verify:  check every file of each checkpoint against its manifest (any layout); exit 4 on damage.
upgrade: adopt a sharded checkpoint of the previous layout (`.complete` marker, no manifest): its
         marker must match `.metadata`, `.metadata` must unpickle as DCP metadata only, every shard
         it names must be present and long enough, and the whole state must load; then a manifest
         is written and the directory loads like a new one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from .errors import CheckpointError
from .legacy import OLD_MARKER, is_legacy_dcp, load_plain
from .manifest import file_digest, write_manifest
from .safe_load import load_metadata
from .trust import METADATA, verify

__all__ = ["main", "upgrade"]


def upgrade(path: Path) -> None:
    path = Path(path)
    if not is_legacy_dcp(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint of the previous layout (no {OLD_MARKER} "
                              "marker, or it already has a manifest)")
    try:
        marker = json.loads((path / OLD_MARKER).read_text())
        expected = marker["metadata_sha256"] if isinstance(marker, dict) else None
    except (ValueError, KeyError, OSError):
        expected = None
    raw = (path / METADATA).read_bytes()
    if not isinstance(expected, str) or hashlib.sha256(raw).hexdigest() != expected:
        raise CheckpointError(f"{path}: {METADATA} does not match {OLD_MARKER}; not adopted")
    metadata = load_metadata(raw, str(path / METADATA))
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in needed.items():
        if not (path / name).is_file() or (path / name).stat().st_size < end:
            raise CheckpointError(f"{path}: shard {name} is missing or shorter than {METADATA} says; not adopted")
    files = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != OLD_MARKER}
    from .store import read_full_state  # a full read: every shard must deserialize

    step = load_plain(path / "extras" / "rank_0.pt").get("step", -1)
    write_manifest(path, files, {"step": step, "world_size": marker.get("world_size"), "upgraded": True})
    try:
        read_full_state(path)
    except Exception as e:
        (path / "manifest.json").unlink()
        raise CheckpointError(f"{path}: its state does not load ({str(e).splitlines()[0][:160]}); not adopted") \
            from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m h64lm.runtime.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["verify", "upgrade"])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.paths:
        start = time.perf_counter()
        try:
            if args.command == "upgrade":
                upgrade(path)
            verify(path)
        except (CheckpointError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
        print(f"{path}: verified in {time.perf_counter() - start:.2f} s"
              + (" and adopted (manifest written)" if args.command == "upgrade" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
