"""Speed of H64LM against Hugging Face `MixtralForCausalLM`, side by side in one process.

    python experiments/bench.py [--sizes tiny demo] [--rounds 5] [--out DIR]
                                [--experts 8 64] [--experts-hidden 256]
                                [--device cpu|cuda] [--dtype fp32|bf16] [--compile] [--smoke]

Both models get the identical network (every layer MoE, RoPE, no window; the `tiny` and `demo`
presets otherwise), the same weights, batch, dtype and threads, and the same AdamW. Candidates run
alternately (A B A B ...) after warm-up and each figure is a median. Measured: training tokens/s
and ours/HF; achieved FLOP/s and MFU (active FLOPs from `flops_per_token`; the peak is a plain
matrix product of the step's largest shape, the LM head's, measured in this run on CPU, the
datasheet bf16 dense peak on known GPUs); peak memory of a step; tokens/s as the expert count
grows at top-2 and fixed expert size (at hidden 256, every layer MoE), with the step seconds each
added expert costs; greedy KV-cache generation tokens/s at batch 1 and 8; and
the data loader's share of a step. The load average is recorded before and after each timed
section, and OpenMP's spin-wait is shortened as in run.py. Writes `bench.json` and `bench.md` into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
from pathlib import Path

from h64lm.cpu_malloc import keep_freed_memory
from h64lm.cpu_threads import limit_spin_wait

os.environ.setdefault("HF_HUB_OFFLINE", "1")
limit_spin_wait()  # as run.py does, before torch starts OpenMP: measure what training runs

import numpy as np
import torch
import transformers
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from experiments.bench_measure import (
    alternate,
    forward_loss,
    generate_call,
    matmul_peak,
    profile_step,
    step_peak_bytes,
    train_step,
)
from experiments.bench_report import render_markdown
from h64lm.config import OptimConfig
from h64lm.data.loader import TokenLoader
from h64lm.hf.stock import to_hf_mixtral
from h64lm.model import (
    H64LMConfig,
    H64LMForCausalLM,
    active_parameters_per_token,
    count_parameters,
    flops_per_token,
)
from h64lm.optim.optimizer import build_optimizer
from h64lm.train.mfu import peak_flops

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The network Mixtral can express: every layer sparse, rotary positions only, no window.
MIXTRAL_SHAPE = dict(moe_layers="all", position_encoding="rope", sliding_window=None)
SMOKE_MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=4,
                   num_kv_heads=2, intermediate_size=64, moe_intermediate_size=32,
                   max_position_embeddings=64, tie_word_embeddings=True)
# (batch, sequence) per size: the demo shape at 2 x 512 keeps one step at seconds on 2 cores.
SHAPES = {"tiny": (8, 256), "demo": (2, 512), "smoke": (2, 16)}
SDPA_BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def bench_config(size: str, **overrides) -> H64LMConfig:
    if size == "smoke":
        fields = dict(SMOKE_MODEL)
    else:
        fields = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{size}.yaml"))
        fields.pop("defaults", None)
    return H64LMConfig(**{**fields, **MIXTRAL_SHAPE, **overrides})


def build_pair(cfg: H64LMConfig, device: torch.device, compile_models: bool, seed: int = 0,
               frozen: bool = False):
    """-> (ours, hf, ours_optimizer, hf_optimizer), train mode, same weights, same AdamW.

    frozen: learning rate 0. AdamW still does all its work, but the weights never move, so every
    step routes the same tokens to the same experts. Repeated steps on one batch at the default
    learning rate skew the routing within a few steps (at 64 experts, half of them idle in some
    layers), and each model skews it its own way: the two would no longer do the same work."""
    torch.manual_seed(seed)
    ours = H64LMForCausalLM(cfg).to(device).train()
    hf = to_hf_mixtral(ours).train()
    optim = OptimConfig(name="adamw")  # muon_layouts knows only our modules; AdamW for both
    opts = build_optimizer(ours, optim, device), build_optimizer(hf, optim, device)
    for group in (g for opt in opts for g in opt.param_groups) if frozen else ():
        group["lr"] = 0.0
    if compile_models:
        ours, hf = torch.compile(ours), torch.compile(hf)
    return ours, hf, *opts


def batch(cfg: H64LMConfig, b: int, t: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def peak_for(cfg: H64LMConfig, tokens: int, dtype, device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if device.type == "cuda":
        peak = peak_flops(device)
        if peak is not None:
            return peak, f"datasheet bf16 dense, {torch.cuda.get_device_name(device)}"
    measured = matmul_peak(tokens, cfg.hidden_size, cfg.vocab_size, dtype, device)
    return measured, f"measured [{tokens}, {cfg.hidden_size}] @ [{cfg.hidden_size}, " \
                     f"{cfg.vocab_size}] {str(dtype).removeprefix('torch.')}"


def shape(size: str, args) -> tuple[int, int]:
    """(batch, sequence) for `size`, each overridable from the command line."""
    b, t = SHAPES[size]
    return args.batch or b, args.seq or t


def bench_training(size: str, args, device, dtype) -> dict:
    cfg = bench_config(size)
    b, t = shape(size, args)
    ours, hf, opt_ours, opt_hf = build_pair(cfg, device, args.compile)
    x, y = batch(cfg, b, t, device)
    steps = {"ours": train_step(ours, opt_ours, x, y, hf=False, dtype=dtype),
             "hf": train_step(hf, opt_hf, x, y, hf=True, dtype=dtype)}
    peak_before, load_before = peak_for(cfg, b * t, dtype, device), os.getloadavg()
    seconds = alternate(steps, args.warmup, args.rounds, device)
    peak_after, load_after = peak_for(cfg, b * t, dtype, device), os.getloadavg()
    peak, peak_source = max(peak_before, peak_after)
    memory = {name: step_peak_bytes(fn, device) for name, fn in steps.items()}
    # the forward alone: activations kept for backward, without the gradients that dominate the
    # step's peak once parameters outnumber activations
    forward = {"ours": forward_loss(ours, x, y, hf=False, dtype=dtype),
               "hf": forward_loss(hf, x, y, hf=True, dtype=dtype)}
    activations = {name: step_peak_bytes(fn, device) for name, fn in forward.items()}
    profiles = ({name: profile_step(fn) for name, fn in steps.items()} if args.profile else None)
    flops = flops_per_token(cfg, t)
    result = {
        "size": size, "batch": b, "seq_len": t, "params": count_parameters(cfg),
        "active_params": active_parameters_per_token(cfg), "flops_per_token": flops,
        "peak_flops": peak, "peak_source": peak_source, "step_s": seconds,
        "loader_share": loader_share(cfg, b, t, seconds["ours"]), "profile": profiles,
        "load_avg": [load_before, load_after],
    }
    for name in steps:
        rate = b * t / seconds[name]
        result[name] = {"tokens_per_s": rate, "flops": rate * flops, "mfu": rate * flops / peak,
                        "peak_step_bytes": memory[name], "peak_forward_bytes": activations[name]}
    result["ratio"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    del ours, hf, opt_ours, opt_hf, steps, forward
    gc.collect()
    return result


def bench_experts(size: str, counts: list[int], args, device, dtype) -> dict:
    """Training tokens/s for each expert count (top-2, expert size fixed), all alternating.

    The weights stay frozen (`build_pair`): every round routes alike in both models.
    Besides tokens/s, the step seconds each added expert costs, (t_last - t_first) /
    (last - first), per model: a ratio t_first / t_last compares the two scalings only when their
    first steps take equally long, and ours is the faster one, so the absolute cost is the fairer
    figure of what an expert count adds."""
    b, t = shape(size, args)
    hidden = {"hidden_size": args.experts_hidden} if args.experts_hidden else {}
    steps, keep = {}, []
    for num_experts in counts:
        cfg = bench_config(size, num_experts=num_experts, **hidden)
        ours, hf, opt_ours, opt_hf = build_pair(cfg, device, args.compile, frozen=True)
        x, y = batch(cfg, b, t, device)
        steps[f"ours/{num_experts}"] = train_step(ours, opt_ours, x, y, hf=False, dtype=dtype)
        steps[f"hf/{num_experts}"] = train_step(hf, opt_hf, x, y, hf=True, dtype=dtype)
        keep.append((ours, hf, opt_ours, opt_hf))
    load_before = os.getloadavg()
    seconds = alternate(steps, args.warmup, args.rounds, device)
    load_after = os.getloadavg()
    rates = {name: b * t / s for name, s in seconds.items()}
    del steps, keep
    gc.collect()
    first, last = counts[0], counts[-1]
    added = {name: (seconds[f"{name}/{last}"] - seconds[f"{name}/{first}"]) / (last - first)
             for name in ("ours", "hf")} if last > first else None
    return {"size": size, "hidden_size": cfg.hidden_size, "batch": b, "seq_len": t,
            "experts": counts, "tokens_per_s": rates, "step_s": seconds,
            "ours_scaling": rates[f"ours/{last}"] / rates[f"ours/{first}"],
            "hf_scaling": rates[f"hf/{last}"] / rates[f"hf/{first}"],
            "seconds_per_added_expert": added, "load_avg": [load_before, load_after]}


def bench_generation(size: str, batches: list[int], args, device, dtype) -> dict:
    cfg = bench_config(size)
    torch.manual_seed(0)
    ours = H64LMForCausalLM(cfg).to(device).eval()
    hf = to_hf_mixtral(ours).eval()
    calls, agree = {}, {}
    for b in batches:
        prompt = batch(cfg, b, args.prompt_len, device, seed=2)[0]
        calls[f"ours/{b}"] = generate_call(ours, prompt, args.new_tokens, hf=False, dtype=dtype)
        calls[f"hf/{b}"] = generate_call(hf, prompt, args.new_tokens, hf=True, dtype=dtype)
        # greedy decoding of the same weights: how many generated tokens agree (rounding can
        # flip a near-tie and the continuations then differ); also the first warm-up call
        same = calls[f"ours/{b}"]() == calls[f"hf/{b}"]()
        agree[b] = same[:, args.prompt_len:].float().mean().item()
    load_before = os.getloadavg()
    seconds = alternate(calls, max(args.warmup - 1, 0), args.rounds, device)
    rates = {name: int(name.split("/")[1]) * args.new_tokens / s for name, s in seconds.items()}
    return {"size": size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "tokens_per_s": rates, "greedy_agreement": agree,
            "load_avg": [load_before, os.getloadavg()],
            "ratio": {b: rates[f"ours/{b}"] / rates[f"hf/{b}"] for b in batches}}


def loader_share(cfg: H64LMConfig, b: int, t: int, step_s: float, calls: int = 200) -> float:
    """`TokenLoader.next_batch` time over a memmap-like token array, as a share of one step."""
    import time

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1_000_000, dtype=np.uint16)
    loader = TokenLoader(tokens, t, b, seed=0)
    loader.next_batch()
    started = time.perf_counter()
    for _ in range(calls):
        loader.next_batch()
    return (time.perf_counter() - started) / calls / step_s


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "omp_wait": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                         if k in os.environ},
            "load_avg": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in lines
                               if ln.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "demo"], choices=sorted(SHAPES))
    p.add_argument("--experts", nargs="+", type=int, default=[8, 64],
                   help="expert counts of the scaling comparison (first and last are compared)")
    p.add_argument("--experts-hidden", type=int, default=256,
                   help="hidden size of the expert-scaling networks (0 = the size's own); at "
                        "tiny's 128 the 32k LM head hides the experts")
    p.add_argument("--gen-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="cpu: malloc keeps freed memory as run.py does (hardware.keep_freed_memory), "
                        "for both models; default: glibc's own behaviour")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="bf16 = autocast over fp32 weights, as in training")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--sdpa", default="default", choices=sorted(SDPA_BACKENDS),
                   help="restrict scaled_dot_product_attention to one kernel (both models)")
    p.add_argument("--batch", type=int, default=None, help="override the batch of every size")
    p.add_argument("--seq", type=int, default=None, help="override the sequence of every size")
    p.add_argument("--profile", action="store_true",
                   help="also profile one training step of each model: time per kind of op")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "experts", "generate"])
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run on a toy shape (checks that everything runs)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.experts, args.gen_batches = ["smoke"], [4, 8], [1, 2]
        args.experts_hidden = 0
        args.prompt_len, args.new_tokens, args.rounds, args.warmup = 4, 3, 1, 1
    if args.experts_hidden < 0:
        raise SystemExit("--experts-hidden must be >= 0 (0 = the size's own hidden size)")
    for name in ("rounds", "prompt_len", "new_tokens", "batch", "seq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    kept = device.type == "cpu" and args.malloc == "keep" and keep_freed_memory()
    results = {"command": "python experiments/bench.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine(device) | {"malloc_keeps_freed": kept}, "dtype": args.dtype, "compile": args.compile,
               "sdpa": args.sdpa, "train": [], "experts": None, "generate": None}
    backend = SDPA_BACKENDS[args.sdpa]
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        run_all(args, device, dtype, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    table = render_markdown(results)
    (out / "bench.md").write_text(table)
    print(table)
    return results


def run_all(args, device, dtype, results: dict) -> None:
    for size in args.sizes:
        if "train" not in args.skip:
            results["train"].append(bench_training(size, args, device, dtype))
            print(json.dumps(results["train"][-1], default=str), flush=True)
    if "experts" not in args.skip:
        results["experts"] = bench_experts(args.sizes[0], args.experts, args, device, dtype)
        print(json.dumps(results["experts"]), flush=True)
    if "generate" not in args.skip:
        results["generate"] = bench_generation(args.sizes[0], args.gen_batches, args, device,
                                               dtype)
        print(json.dumps(results["generate"]), flush=True)


if __name__ == "__main__":
    main()
