"""Correctness before speed, on whatever device the benchmark runs on:

    python experiments/bench_correctness.py [--device cuda] [--compile] [--out DIR]

1. fp32 logits of ours equal Hugging Face Mixtral's with the same weights (every layer MoE, RoPE);
2. bf16 autocast logits stay within tolerance of the fp32 ones and pick the same top token;
3. a short bf16 run (AdamW on one fixed batch, through the SDPA kernel the benchmark uses and
   torch.compile if asked) lowers the loss well below its start.
Prints one JSON line per check, writes `correctness.json` into --out, exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from experiments.bench import bench_config
from h64lm.hf.stock import to_hf_mixtral
from h64lm.model import H64LMForCausalLM
from h64lm.objectives.lm import lm_loss

# bf16 keeps 8 mantissa bits (~0.4% per rounding); through a few layers the logits drift by a
# few percent of their norm, while a real bug (wrong cast, lost scale) gives O(1).
BF16_REL_TOL = 0.05
HF_REL_TOL = 1e-4
LOSS_DROP = 0.5  # final loss must be below this fraction of the first


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def check_logits(size: str, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = H64LMForCausalLM(bench_config(size)).to(device).eval()
    hf = to_hf_mixtral(model).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    ref = model(ids).logits
    hf_rel = _rel(hf(ids).logits, ref)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        low = model(ids).logits
    bf16_rel = _rel(low, ref)
    top_agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return [
        {"check": "fp32 logits vs HF Mixtral", "rel_error": hf_rel, "tol": HF_REL_TOL,
         "ok": hf_rel <= HF_REL_TOL},
        {"check": "bf16 autocast logits vs fp32", "rel_error": bf16_rel, "tol": BF16_REL_TOL,
         "top1_agreement": top_agree, "ok": bf16_rel <= BF16_REL_TOL and top_agree >= 0.9},
    ]


def check_training(size: str, device: torch.device, compile_model: bool, steps: int,
                   lr: float = 3e-3) -> dict:
    torch.manual_seed(0)
    model = H64LMForCausalLM(bench_config(size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    step_model = torch.compile(model) if compile_model else model
    ids = torch.randint(0, model.config.vocab_size, (4, 65), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(steps):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = lm_loss(step_model(x, labels=y, return_logits=False), model.config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ok = all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < LOSS_DROP * losses[0]
    return {"check": f"bf16 run of {steps} steps lowers the loss", "first": losses[0],
            "last": losses[-1], "required_below": LOSS_DROP * losses[0],
            "compile": compile_model, "ok": bool(ok)}


def main(argv=None) -> bool:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "demo", "smoke"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = check_logits(args.size, device)
    results.append(check_training(args.size, device, args.compile, args.steps, args.lr))
    for r in results:
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "correctness.json").write_text(json.dumps(results, indent=2))
    return all(r["ok"] for r in results)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
