"""`mode=eval`, `mode=generate` and `mode=chat`: a trained checkpoint against data or prompts;
`mode=plan`: the memory and time of every parallel layout of the composed config (h64lm/plan);
`mode=pipeline`: training stages in order, each from the one before (h64lm/train/pipeline.py).

Their outputs land beside the run they read (`RUN/evals/<time>/eval.json`,
`RUN/generations/<time>/generations.txt`, `RUN/chats/<time>/chat.txt`, chosen by the `h64lm_run_dir` resolver in
h64lm/config.py), and the path is printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from h64lm.config import RunConfig
from h64lm.data import DataConfig, check_vocab, load_tokenizer, prepare_corpus, validation_windows
from h64lm.data.config import SFT_SOURCES
from h64lm.eval.samples import sample_continuations
from h64lm.eval.validation import evaluate
from h64lm.model import H64LMForCausalLM
from h64lm.runtime.checkpoint import load_trained_model, read_extras, resolve
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import Precision, resolve_precision
from h64lm.validation import ConfigError

__all__ = ["evaluate_checkpoint", "generate_from_checkpoint", "chat_reply",
           "chat_with_checkpoint", "export_checkpoint",
           "plan_layouts_for", "run_pipeline"]


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
    batch = run_cfg.train.val_batch_size or run_cfg.train.batch_size
    precision = resolve_precision(run_cfg.hardware.precision, d.device)
    if data.name in SFT_SOURCES:
        return _evaluate_sft(run_cfg, data, model, precision, out_dir, d)
    corpus_val = prepare_corpus(data, tokenizer).val
    windows = validation_windows(corpus_val, data.seq_len, data.val_windows)
    if d.is_main:
        print(f"evaluating {run_cfg.checkpoint} on {len(windows)} windows of {data.seq_len} tokens "
              f"({data.name}), batch {batch}", flush=True)
    loss, ppl = evaluate(model, windows, batch, precision, d)
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


def _evaluate_sft(run_cfg: RunConfig, data: DataConfig, model: H64LMForCausalLM, precision: Precision,
                  out_dir: Path, d: Dist) -> float:
    """A fine-tuned checkpoint: the loss on the held-out conversations' assistant tokens (as the
    run validated) and, for a task with a test split, exact-match accuracy (`stage.eval_examples`)."""
    from h64lm.eval.exact_match import TASK_SOURCES, arithmetic_solved
    from h64lm.eval.validation import evaluate_batches
    from h64lm.train.stage import sft_validation_batches

    t, s = run_cfg.train, run_cfg.stage
    batches = sft_validation_batches(data, t.val_batch_size or t.batch_size)
    if d.is_main:
        print(f"evaluating {run_cfg.checkpoint} on {sum(len(b.input_ids) for b in batches)} packed "
              f"windows of held-out {data.name} conversations", flush=True)
    loss, ppl = evaluate_batches(model, batches, precision, d)
    result = {"checkpoint": str(run_cfg.checkpoint), "data": data.name, "seq_len": data.seq_len,
              "targets": sum(b.num_targets() for b in batches), "val_loss": loss, "val_ppl": ppl}
    if data.name in TASK_SOURCES and s.eval_examples:
        solved = arithmetic_solved(model, s.eval_examples, s.eval_max_new_tokens,
                                   t.val_batch_size or t.batch_size, precision.autocast)
        result["sft/exact_match"] = sum(solved) / len(solved)
        result["exact_match_examples"] = s.eval_examples
        result["exact_match_solved"] = [int(x) for x in solved]  # per problem, for paired comparisons
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
        accuracy = (f"  exact match {result['sft/exact_match']:.3f} on {s.eval_examples} test problems"
                    if "sft/exact_match" in result else "")
        print(f"val_loss {loss:.4f}  val_ppl {ppl:.2f}  ({result['targets']} assistant tokens of {data.name})"
              f"{accuracy}; written to {out_dir / 'eval.json'}", flush=True)
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


def chat_reply(model: H64LMForCausalLM, chat, messages: list, gen, device: torch.device,
               generator: torch.Generator | None = None) -> str:
    """The model's next assistant turn after `messages` (Mistral's v1 chat format), sampled with
    `gen.*` (temperature 0 = greedy) until `</s>` or `gen.max_new_tokens`."""
    prompt = torch.tensor([chat.prompt(messages)], device=device)  # [1, T]
    out = model.generate(prompt, gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                         top_p=gen.top_p, repetition_penalty=gen.repetition_penalty,
                         eos_token_id=chat.eos_id, pad_token_id=chat.eos_id, generator=generator)
    reply = out[0, prompt.shape[1]:].tolist()
    return chat.decode(reply[:reply.index(chat.eos_id)] if chat.eos_id in reply else reply)


def chat_with_checkpoint(run_cfg: RunConfig, out_dir: Path, d: Dist) -> list[str]:
    """`mode=chat`: `prompt=...` is the first user turn; when stdin is a terminal the conversation
    goes on (history kept) until an empty line or end of input. The transcript lands in
    RUN/chats/<time>/chat.txt. -> the assistant's replies."""
    import sys

    from h64lm.data.chat import ChatFormat, Message

    interactive = sys.stdin.isatty()
    if run_cfg.prompt is None and not interactive:
        raise ConfigError("mode=chat needs prompt=... (the user's message) when stdin is not a terminal")
    model, _ = load_trained_model(run_cfg.checkpoint, d.device)
    chat, messages, replies = ChatFormat(), [], []
    generator = torch.Generator(device=d.device).manual_seed(run_cfg.gen.seed)
    text = run_cfg.prompt
    while True:
        if text is None:
            try:
                text = input("user> ").strip()
            except EOFError:
                text = ""
            if not text:
                break
        messages.append(Message("user", text))
        replies.append(chat_reply(model, chat, messages, run_cfg.gen, d.device, generator))
        messages.append(Message("assistant", replies[-1]))
        if d.is_main:
            print(f"assistant> {replies[-1]}", flush=True)
        if not interactive:
            break
        text = None
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "chat.txt").write_text("".join(f"{m.role}: {m.content}\n" for m in messages))
        print(f"written to {out_dir / 'chat.txt'}", flush=True)
    return replies


def export_checkpoint(run_cfg: RunConfig, out_dir: Path, d: Dist) -> Path:
    """A Hugging Face folder (h64lm/hf/export.py) of the checkpoint, with the run's tokenizer (and
    the chat template when the run fine-tuned on conversations, stage=sft); the folder's
    h64lm_export.json and the printed line name the checkpoint and its step."""
    from h64lm.data.chat import CHAT_TEMPLATE
    from h64lm.hf import export_hf
    from h64lm.hf.export import check_export_target

    out = Path(run_cfg.out) if run_cfg.out else out_dir / "hf"
    check_export_target(out, run_cfg.export.overwrite)  # before loading anything
    path = resolve(run_cfg.checkpoint)
    model, saved = load_trained_model(path, torch.device("cpu"))
    step = read_extras(path)["step"]
    if d.is_main:
        # a fine-tuned model is used through its chat format: tokenizer.apply_chat_template gives
        # mistral-common's ids (h64lm/data/chat.py CHAT_TEMPLATE)
        template = CHAT_TEMPLATE if saved.stage.name != "pretrain" else None
        reward = saved.stage.name == "reward"  # the scalar head as a *ForSequenceClassification
        info = export_hf(model, load_tokenizer(saved.data), out, overwrite=run_cfg.export.overwrite,
                         record={"checkpoint": str(path), "step": step}, chat_template=template,
                         sequence_classification=reward)
        remote = ", trust_remote_code=True" if info["trust_remote_code"] else ""
        auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
        print(f"exported {path} (step {step}) as {info['architecture']} "
              f"to {out}; load it with {auto}.from_pretrained('{out}'{remote})", flush=True)
    return out


# Keys a plan's launch command sets itself (the layout's), or that configure the plan launch only.
_PLAN_OWN = ("mode=", "plan.", "plan=", "model=", "hardware=", "hardware.strategy=", "hardware.ep=",
             "hardware.distributed=", "model.gradient_checkpointing=", "hydra.", "hydra/")


def _launch_overrides(overrides: list[str]) -> list[str]:
    """The command line's keys that the planned run keeps: all but the plan's own, the mode, the
    model preset (named by the launch command), the keys that the layout sets, and Hydra's
    settings of the plan launch itself (its output folder)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(_PLAN_OWN)]


def _assumptions(run_cfg: RunConfig, overrides: list[str], accum: int, precision: str) -> str:
    """One line: the shape the plan is for, naming the keys that kept their defaults."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    t = run_cfg.train
    shape = {"data.seq_len": run_cfg.data.seq_len, "train.batch_size": t.batch_size,
             "train.global_batch_size" if t.global_batch_size else "train.grad_accum": t.global_batch_size or accum,
             "hardware.precision": run_cfg.hardware.precision, "optim.name": run_cfg.optim.name}
    defaults = [k for k in shape if k not in given and not (k == "optim.name" and "optim" in given)]
    line = (f"planned for: {' '.join(f'{k}={v}' for k, v in shape.items())} ({precision} bytes), "
            f"{accum} micro-batch(es) per GPU and step")
    if defaults:
        line += f"; not set on the command line, so the defaults: {', '.join(defaults)}"
    return line


def _budget(run_cfg: RunConfig, best) -> str:
    """Steps, wall time and GPU-hours of plan.tokens (or train.max_steps) at the layout `best`."""
    from h64lm.plan.report import duration

    per_step = best.tokens_per_step
    if run_cfg.plan.tokens is None:
        steps, what = run_cfg.train.max_steps, f"train.max_steps={run_cfg.train.max_steps}"
    else:
        steps, what = math.ceil(run_cfg.plan.tokens / per_step), f"plan.tokens={run_cfg.plan.tokens:.4g}"
    seconds = steps * best.time_s
    return (f"{what}: {steps:,} steps x {per_step:,} tokens = {steps * per_step:.4g} tokens, "
            f"{duration(seconds)} on {best.gpus} GPU(s) = {seconds * best.gpus / 3600:,.1f} GPU-hours "
            f"(at plan.mfu={run_cfg.plan.mfu} of plan.peak_tflops={run_cfg.plan.peak_tflops:g})")


def plan_layouts_for(run_cfg: RunConfig, model_name: str, overrides: list[str], out_dir: Path) -> str:
    """`mode=plan`: every layout of the composed model/data/train config on `plan.gpus` GPUs,
    the cheapest that fits, its time and GPU-hours for the token budget, and its torchrun and
    SLURM commands (the user's own overrides kept); printed and written to `out_dir/plan.txt`
    (outputs/plans/<time>/). -> the text."""
    from h64lm.plan import format_plan, plan_layouts, recommend
    from h64lm.plan.report import launch_command

    p, t = run_cfg.plan, run_cfg.train
    accum = t.micro_batches_per_step(p.gpus)
    precision = "fp32" if run_cfg.hardware.precision == "fp32" else "bf16"
    layouts = plan_layouts(
        run_cfg.model, gpus=p.gpus, seq_len=run_cfg.data.seq_len, micro_batch=t.batch_size, grad_accum=accum,
        precision=precision, optim=run_cfg.optim.name,
        peak_tflops=p.peak_tflops, mfu=p.mfu, gpu_mem_gb=p.gpu_mem_gb, headroom=p.headroom)
    kept = _launch_overrides(overrides)
    text = _assumptions(run_cfg, overrides, accum, precision) + "\n"
    text += format_plan(layouts, model_name, p.gpu_mem_gb, p.gpus_per_node, kept)
    best = recommend(layouts)
    if best is not None:
        torchrun = launch_command(best, model_name, p.gpus_per_node, kept)
        per_node = min(p.gpus, p.gpus_per_node)
        slurm = (f"python run.py -m hydra/launcher=slurm hydra.launcher.nodes={p.gpus // per_node} "
                 f"hydra.launcher.tasks_per_node={per_node} hydra.launcher.gpus_per_node={per_node} "
                 + torchrun.split(" run.py ", 1)[1])
        text += f"\n\n{_budget(run_cfg, best)}\nlaunch ({p.gpus} GPU(s)):\n  {torchrun}\n  SLURM: {slurm}"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plan.txt").write_text(text + "\n")
    print(text, flush=True)
    return text


def run_pipeline(run_cfg: RunConfig, run_dir: Path, overrides: list[str], launch_dir: Path | None) -> list[dict]:
    """`mode=pipeline` in `run_dir`: one pipeline per folder (its lock), every stage's config
    checked before the first starts (a refusal changes nothing), then the stages
    (h64lm/train/pipeline.py). A failed or stopped stage ends the process with one line and the
    stage's exit code. -> the table's rows (RUN/pipeline.json)."""
    import sys

    from h64lm.runtime.rundir import RunDirLock, adopt_launch_record
    from h64lm.train.pipeline import PipelineStopped, check_stage_configs, run_stages, stage_launches

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir)
    try:
        lock.acquire()
        launches = stage_launches(run_cfg, run_dir, overrides)
        check_stage_configs(launches)
    except Exception as e:
        lock.release()
        e.refused = True
        raise
    try:
        adopt_launch_record(run_dir, launch_dir)
        return run_stages(run_cfg, run_dir, overrides, launches)
    except PipelineStopped as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    finally:
        lock.release()
