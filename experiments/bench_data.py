"""Data pipeline speed: tokenizer set-up, tokenization throughput, and the loader's cost.

    python experiments/bench_data.py [--wikitext2 PATH/wikitext-2/valid.txt]
                                     [--steps 5] [--num-proc N]

Prints, in a fresh temporary cache: the Mistral tokenizer's one-time conversion and its cached
reload; tokens/s for the default corpus (wiki_excerpt) and for WikiText-2 valid (data=text),
both for the tokenization alone and for the whole preparation (reading + cleaning + tokenizing +
writing); the mean `TokenLoader.next_batch` time at batch 8 x 256; and, when `h64lm.model` is
present, that time as a share of one `tiny` training step (forward + backward + AdamW).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch

from h64lm.data import DataConfig, TokenLoader, load_tokenizer, prepare_corpus
from h64lm.data.sources import load_documents
from h64lm.objectives.lm import lm_loss

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 8, 256


def _tokenize_rate(cfg: DataConfig, tokenizer, cache: Path) -> tuple[float, int]:
    """tokens/s of `encode_batch` alone over the training documents (no reading, no writing)."""
    train, _ = load_documents(cfg, cache / "hf_datasets")
    texts = list(train["text"])
    started = time.perf_counter()
    count = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return count / (time.perf_counter() - started), count


def _prepare_rate(cfg: DataConfig, tokenizer, num_proc) -> tuple[float, dict]:
    started = time.perf_counter()
    corpus = prepare_corpus(cfg, tokenizer, num_proc=num_proc)
    seconds = time.perf_counter() - started
    return sum(corpus.meta["tokens"].values()) / seconds, corpus


def _next_batch_ms(tokens: np.ndarray, calls: int = 2000) -> float:
    loader = TokenLoader(tokens, SEQ, BATCH, seed=0)
    loader.next_batch()
    started = time.perf_counter()
    for _ in range(calls):
        loader.next_batch()
    return (time.perf_counter() - started) / calls * 1e3


def _tiny_step_ms(tokens: np.ndarray, steps: int) -> float | None:
    try:
        from omegaconf import OmegaConf

        from h64lm.model import H64LMConfig, H64LMForCausalLM
    except ImportError:
        return None
    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml"))
    fields.pop("defaults", None)
    model = H64LMForCausalLM(H64LMConfig(**fields))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = TokenLoader(tokens, SEQ, BATCH, seed=0)
    times = []
    for step in range(steps + 1):  # the first step warms up allocators and kernels
        x, y = loader.next_batch()
        started = time.perf_counter()
        loss = lm_loss(model(x, labels=y), model.config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wikitext2", default=None,
                        help="a local WikiText-2 valid.txt to time as well (nothing outside the repository by default)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        started = time.perf_counter()
        tokenizer = load_tokenizer(DataConfig(cache_dir=tmp))
        convert = time.perf_counter() - started
        started = time.perf_counter()
        load_tokenizer(DataConfig(cache_dir=tmp))
        reload = time.perf_counter() - started
        print(f"tokenizer: first load (convert + cache) {convert:.2f} s, "
              f"cached reload {reload:.2f} s")

        sources = {"wiki_excerpt": DataConfig(cache_dir=tmp)}
        if args.wikitext2 and Path(args.wikitext2).is_file():
            sources["wikitext-2 valid"] = DataConfig(name="text", path=args.wikitext2,
                                                     cache_dir=tmp)
        else:
            print(f"skipping WikiText-2 valid: {args.wikitext2 or 'no --wikitext2 given'}")
        corpus = None
        for label, cfg in sources.items():
            rate, count = _tokenize_rate(cfg, tokenizer, cache)
            prep_rate, prepared = _prepare_rate(cfg, tokenizer, args.num_proc)
            again = time.perf_counter()
            prepare_corpus(cfg, tokenizer)
            cached_ms = (time.perf_counter() - again) * 1e3
            print(f"{label}: {count:,} train tokens; tokenize {rate:,.0f} tokens/s; "
                  f"whole preparation {prep_rate:,.0f} tokens/s "
                  f"({prepared.meta['seconds']:.2f} s); cached reuse {cached_ms:.1f} ms")
            corpus = corpus or prepared

        batch_ms = _next_batch_ms(corpus.train)
        print(f"TokenLoader.next_batch ({BATCH} x {SEQ}): {batch_ms * 1e3:.1f} us")
        step_ms = _tiny_step_ms(corpus.train, args.steps)
        if step_ms is None:
            print("h64lm.model not importable: no training-step comparison")
        else:
            print(f"tiny training step ({BATCH} x {SEQ}, fp32, median of {args.steps}): "
                  f"{step_ms:.0f} ms; loader share {batch_ms / step_ms * 100:.3f}%")


if __name__ == "__main__":
    main()
