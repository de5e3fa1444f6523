"""Batched sampling speed (the cost that dominates RL) against transformers' `generate`.

    python experiments/bench_generate.py [--size tiny] [--prompts 8] [--group 4] [--new-tokens 64]
        [--top-k K] [--top-p P] [--rounds 7] [--device cpu|cuda] [--dtype fp32|bf16] [--smoke]

One process, the same weights: our model and the stock `MixtralForCausalLM` it exports to
(`to_hf_mixtral`; every layer MoE, RoPE, no window). First greedy decoding of the left-padded
prompts must give the same tokens from both, or the script stops. Then G completions per prompt
of exactly --new-tokens tokens (no EOS), timed alternately (A B C A B C ...) after a warm-up, and
each figure is a median:
  ours           generate(..., num_return_sequences=G): one prefill per prompt
  ours_repeated  the prompts repeated G times (one prefill per completion)
  hf             transformers generate(do_sample=True, num_return_sequences=G)
The load average is printed before and after: on a shared machine compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from experiments.bench import SMOKE_MODEL, bench_config
from experiments.bench_measure import alternate
from h64lm.hf.stock import to_hf_mixtral
from h64lm.model import H64LMConfig, H64LMForCausalLM, left_pad

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _prompts(cfg: H64LMConfig, count: int, device: torch.device, seed: int = 0):
    """`count` random prompts of 8..24 tokens, left-padded -> (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (count,), generator=g).tolist()
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return left_pad(prompts, pad_token_id=0, device=device)


def _sampling_kwargs(args) -> dict:
    return dict(temperature=1.0, top_k=args.top_k, top_p=args.top_p)


def _hf_call(hf, ids, mask, args, G: int):
    # top_k=0 / top_p=1.0 switch transformers' filters off, as None does ours
    kw = _sampling_kwargs(args)
    extra = dict(do_sample=True, temperature=kw["temperature"], top_k=kw["top_k"] or 0,
                 top_p=kw["top_p"] or 1.0)
    return lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, num_return_sequences=G,
                               pad_token_id=0, **extra)


def _check_greedy(ours, hf, ids, mask, new_tokens: int) -> None:
    with torch.no_grad():
        a = ours.generate(ids, new_tokens, temperature=0, attention_mask=mask)
        b = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    T = ids.shape[1]
    if not torch.equal(a[:, T:], b[:, T:]):
        rows = (a[:, T:] != b[:, T:]).any(-1).nonzero().flatten().tolist()
        raise SystemExit(f"greedy outputs differ from transformers in rows {rows}: not the same "
                         "model, timings would compare different work")
    print(f"greedy: {a.shape[0]} prompts x {new_tokens} tokens, identical to transformers")


def main(argv: list[str] | None = None) -> dict:
    """-> {"seconds": {candidate: median s}, "tokens": tokens per call}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", help="a conf/model preset (made Mixtral-shaped)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--smoke", action="store_true", help="a toy model and 2 rounds (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.new_tokens, args.prompts, args.group = 2, 8, 3, 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = (H64LMConfig(**SMOKE_MODEL, moe_layers="all") if args.smoke else bench_config(args.size))
    ours = H64LMForCausalLM(cfg).to(device=device, dtype=DTYPES[args.dtype]).eval()
    hf = to_hf_mixtral(ours).eval()
    ids, mask = _prompts(cfg, args.prompts, device)
    G = args.group
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}"
          f", device {device}, {args.dtype}, threads {torch.get_num_threads()}")
    print(f"model {args.size if not args.smoke else 'smoke'}: hidden {cfg.hidden_size}, "
          f"{cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.num_experts_per_token}, "
          f"vocab {cfg.vocab_size}")
    _check_greedy(ours, hf, ids, mask, args.new_tokens)

    kw = _sampling_kwargs(args)
    rep_ids, rep_mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    candidates = {
        "ours": lambda: ours.generate(ids, args.new_tokens, attention_mask=mask,
                                      num_return_sequences=G, **kw),
        "ours_repeated": lambda: ours.generate(rep_ids, args.new_tokens, attention_mask=rep_mask,
                                               **kw),
        "hf": _hf_call(hf, ids, mask, args, G),
    }
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with torch.no_grad():
        seconds = alternate(candidates, args.warmup, args.rounds, device)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tokens = args.prompts * G * args.new_tokens
    print(f"sampling {args.prompts} prompts x G={G} x {args.new_tokens} new tokens "
          f"(top_k={args.top_k}, top_p={args.top_p}), median of {args.rounds} rounds:")
    for name, s in seconds.items():
        print(f"  {name:<14} {s:8.3f} s  {tokens / s:9.0f} tokens/s  "
              f"hf/this {seconds['hf'] / s:5.2f}x")
    return {"seconds": seconds, "tokens": tokens}


if __name__ == "__main__":
    main()
