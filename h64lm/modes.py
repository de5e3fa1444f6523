"""`mode=eval` and `mode=generate`: a trained checkpoint against data or prompts; `mode=plan`: the
memory and time of every parallel layout of the composed config (h64lm/plan).

Their outputs land beside the run they read (`RUN/evals/<time>/eval.json`,
`RUN/generations/<time>/generations.txt`, chosen by the `h64lm_run_dir` resolver in
h64lm/config.py), and the path is printed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from h64lm.config import RunConfig, run_config_from_yaml
from h64lm.data import DataConfig, check_vocab, load_tokenizer, prepare_corpus, validation_windows
from h64lm.model import H64LMForCausalLM
from h64lm.runtime.checkpoint import load_into, read_extras, resolve
from h64lm.train.distributed import Dist
from h64lm.train.evaluate import evaluate, sample_continuations
from h64lm.train.precision import resolve_precision

__all__ = ["load_trained_model", "evaluate_checkpoint", "generate_from_checkpoint", "export_checkpoint",
           "plan_layouts_for"]


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[H64LMForCausalLM, RunConfig]:
    """(model in eval mode, the run config it was trained with) from a verified checkpoint (any
    layout and world size: its weights are gathered into this plain model) or a run directory's
    newest that verifies."""
    path = resolve(checkpoint)
    saved = run_config_from_yaml(read_extras(path)["config"])
    model = H64LMForCausalLM(saved.model)
    load_into(path, model)
    return model.to(device).eval(), saved


def _data_for_eval(run_cfg: RunConfig, saved: RunConfig, overrides: list[str]) -> DataConfig:
    """The run's own data unless the command line names other data; a `text` file is read whole."""
    if not any(o.lstrip("+~").startswith("data") for o in overrides):
        return saved.data
    data = run_cfg.data
    if data.name == "text" and data.path and not data.val_path:
        data = dataclasses.replace(data, val_path=data.path, val_windows=None)
    return data


def evaluate_checkpoint(run_cfg: RunConfig, out_dir: Path, overrides: list[str], d: Dist) -> float:
    model, saved = load_trained_model(run_cfg.checkpoint, d.device)
    data = _data_for_eval(run_cfg, saved, overrides)
    tokenizer = load_tokenizer(data)
    check_vocab(tokenizer, model.config.vocab_size)
    corpus_val = prepare_corpus(data, tokenizer).val
    windows = validation_windows(corpus_val, data.seq_len, data.val_windows)
    batch = run_cfg.train.val_batch_size or run_cfg.train.batch_size
    if d.is_main:
        print(f"evaluating {run_cfg.checkpoint} on {len(windows)} windows of {data.seq_len} tokens "
              f"({data.name}), batch {batch}", flush=True)
    loss, ppl = evaluate(model, windows, batch, resolve_precision(run_cfg.hardware.precision, d.device), d)
    result = {"checkpoint": str(run_cfg.checkpoint), "data": data.name, "seq_len": data.seq_len,
              "windows": len(windows), "tokens": len(windows) * data.seq_len, "val_loss": loss, "val_ppl": ppl}
    ev = run_cfg.eval
    if ev.tasks and d.is_main:
        from h64lm.eval import downstream_metrics

        print(f"lm-evaluation-harness: {', '.join(ev.tasks)}", flush=True)
        result["tasks"] = downstream_metrics(model, tokenizer, list(ev.tasks), corpus_val, out_dir / "harness",
                                             str(d.device), batch, ev.limit, ev.num_fewshot, ev.local_examples)
        for task, metrics in result["tasks"].items():
            print(f"  {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"val_loss {loss:.4f}  val_ppl {ppl:.2f}  ({result['tokens']} tokens of {data.name}); "
              f"written to {out_dir / 'eval.json'}", flush=True)
    return loss


def generate_from_checkpoint(run_cfg: RunConfig, out_dir: Path, d: Dist) -> None:
    model, saved = load_trained_model(run_cfg.checkpoint, d.device)
    tokenizer = load_tokenizer(saved.data)
    gen = run_cfg.gen
    prompts = [run_cfg.prompt] if run_cfg.prompt is not None else list(run_cfg.train.sample_prompts)
    texts = []
    for i in range(gen.num_samples):
        texts += sample_continuations(
            model, tokenizer, prompts, gen.max_new_tokens, d.device, temperature=gen.temperature,
            top_k=gen.top_k, top_p=gen.top_p, repetition_penalty=gen.repetition_penalty, seed=gen.seed + i)
    if d.is_main:
        for text in texts:
            print(text + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generations.txt").write_text("\n\n".join(texts) + "\n")
        print(f"written to {out_dir / 'generations.txt'}", flush=True)


def export_checkpoint(run_cfg: RunConfig, out_dir: Path, d: Dist) -> Path:
    """A Hugging Face folder (h64lm/hf/export.py) of the checkpoint, with the run's tokenizer."""
    from h64lm.hf import export_hf

    model, saved = load_trained_model(run_cfg.checkpoint, torch.device("cpu"))
    out = Path(run_cfg.out) if run_cfg.out else out_dir / "hf"
    if d.is_main:
        info = export_hf(model, load_tokenizer(saved.data), out)
        remote = ", trust_remote_code=True" if info["trust_remote_code"] else ""
        print(f"exported {run_cfg.checkpoint} as {info['architecture']} to {out}; load it with "
              f"AutoModelForCausalLM.from_pretrained('{out}'{remote})", flush=True)
    return out


def _launch_overrides(overrides: list[str]) -> list[str]:
    """The command line's keys that the planned run keeps (not the plan's own, the mode, the
    model preset, or the hardware keys that the layout sets)."""
    dropped = ("mode=", "plan.", "model=", "hardware", "model.gradient_checkpointing=")
    return [o for o in overrides if not o.lstrip("+~").startswith(dropped)]


def plan_layouts_for(run_cfg: RunConfig, model_name: str, overrides: list[str], out_dir: Path) -> str:
    """`mode=plan`: every layout of the composed model/data/train config on `plan.gpus` GPUs,
    the cheapest that fits, and its torchrun and SLURM commands; printed and written to
    `out_dir/plan.txt` (outputs/plans/<time>/). -> the text."""
    from h64lm.plan import format_plan, launch_command, plan_layouts, recommend

    p, t = run_cfg.plan, run_cfg.train
    layouts = plan_layouts(
        run_cfg.model, gpus=p.gpus, seq_len=run_cfg.data.seq_len, micro_batch=t.batch_size,
        grad_accum=t.micro_batches_per_step(p.gpus),
        precision="fp32" if run_cfg.hardware.precision == "fp32" else "bf16", optim=run_cfg.optim.name,
        peak_tflops=p.peak_tflops, mfu=p.mfu, gpu_mem_gb=p.gpu_mem_gb, headroom=p.headroom)
    text = format_plan(layouts, model_name, p.gpu_mem_gb)
    best = recommend(layouts)
    if best is not None:
        extra = " ".join(_launch_overrides(overrides))
        torchrun = launch_command(best, model_name, p.gpus_per_node) + (f" {extra}" if extra else "")
        per_node = min(p.gpus, p.gpus_per_node)
        slurm = (f"python run.py -m hydra/launcher=slurm hydra.launcher.nodes={p.gpus // per_node} "
                 f"hydra.launcher.tasks_per_node={per_node} hydra.launcher.gpus_per_node={per_node} "
                 + torchrun.split(" run.py ", 1)[1])
        text += f"\n\nlaunch ({p.gpus} GPU(s)):\n  {torchrun}\n  SLURM: {slurm}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.txt").write_text(text + "\n")
    print(text, flush=True)
    return text
