"""What the token cache's self-check costs at every open (h64lm/data/integrity.py).

    python experiments/bench_cache_check.py [--tokens 100000000]

Prints, for the default corpus (wiki_excerpt) and a synthetic uint16 cache of `--tokens`
tokens: the bytes, writing the manifest (once, at build), the check at open (sizes + full
CRC-32) with the files in the page cache, and the sampled check a file above FULL_CHECK_BYTES
would get.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np

import h64lm.data.integrity as integrity
from h64lm.data import DataConfig, load_tokenizer, prepare_corpus


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _report(name: str, folder: Path) -> None:
    size = sum(p.stat().st_size for p in folder.glob("*.bin"))
    write = _best(lambda: integrity.write_manifest(folder), 1)
    full = _best(lambda: integrity.check_manifest(folder))
    limit = integrity.FULL_CHECK_BYTES
    integrity.FULL_CHECK_BYTES = 0  # as if the files were large: sampled blocks only
    integrity.write_manifest(folder)
    sampled = _best(lambda: integrity.check_manifest(folder))
    integrity.FULL_CHECK_BYTES = limit
    integrity.write_manifest(folder)
    print(f"{name:<28} {size / 1e6:8.1f} MB  manifest {write * 1e3:7.1f} ms  check at open "
          f"{full * 1e3:7.1f} ms ({size / full / 1e9:.2f} GB/s)  sampled {sampled * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(cache_dir=os.environ.get("H64LM_CACHE_DIR", tmp))
        corpus = prepare_corpus(cfg, load_tokenizer(cfg))
        tokens = corpus.train.size + corpus.val.size
        _report(f"wiki_excerpt ({tokens / 1e6:.2f}M tokens)", corpus.path)
        folder = Path(tmp) / "synthetic"
        folder.mkdir()
        rng = np.random.default_rng(0)
        rng.integers(0, 32000, opts.tokens, dtype=np.uint16).tofile(folder / "train.bin")
        _report(f"synthetic ({opts.tokens / 1e6:.0f}M tokens)", folder)


if __name__ == "__main__":
    main()
