"""The training loop: plain PyTorch, one process or many under torchrun.

One optimizer step = `train.grad_accum` micro-batches of `train.batch_size` sequences per rank.
Everything that decides what happens at a step (data windows, learning rate, RNG) is restored
from a checkpoint, so stopping at step k and resuming reproduces the uninterrupted run exactly
(bit for bit on the CPU in fp32).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from h64lm.config import ConfigError
from h64lm.data import TokenLoader, check_vocab, load_tokenizer, prepare_corpus, validation_windows
from h64lm.model import (
    H64LMConfig,
    H64LMForCausalLM,
    active_parameters_per_token,
    count_parameters,
    flops_per_token,
)
from h64lm.train.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_state,
    resolve_checkpoint_path,
    save_weights,
)
from h64lm.train.control import (
    SignalFlag,
    TrainingDiverged,
    TrainingStopped,
    rng_state,
    set_rng_state,
)
from h64lm.train.distributed import Dist, seed_everything
from h64lm.train.evaluate import evaluate, sample_continuations
from h64lm.train.metrics import History, MetricsFile, plot_run, read_metrics
from h64lm.train.mfu import peak_flops
from h64lm.train.optim import build_optimizer, build_scheduler
from h64lm.train.precision import resolve_precision
from h64lm.train.wandb_sink import WandbSink, wandb_group

__all__ = ["Trainer"]


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Trainer:
    def __init__(self, cfg: DictConfig, parts: dict[str, Any], run_dir: Path, overrides: list[str],
                 d: Dist, sweep_dir: str | None = None):
        self.cfg, self.run_dir, self.overrides, self.d = cfg, Path(run_dir), overrides, d
        self.mcfg: H64LMConfig = parts["model"]
        self.data, self.tcfg, self.ocfg = parts["data"], parts["train"], parts["optim"]
        self.hw, self.lcfg, self.gcfg = parts["hardware"], parts["logger"], parts["gen"]
        self.sweep_dir = sweep_dir
        self.log = tqdm.write if d.is_main else (lambda *a, **k: None)
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_state = self._find_resume_state()

        seed_everything(self.tcfg.seed)
        self.tokenizer = load_tokenizer(self.data)
        check_vocab(self.tokenizer, self.mcfg.vocab_size)
        corpus = prepare_corpus(self.data, self.tokenizer)
        self.loader = TokenLoader(corpus.train, self.data.seq_len, self.tcfg.batch_size,
                                  self.tcfg.seed, d.rank, d.world_size)
        self.val_windows = {
            n: validation_windows(corpus.val, n, self.data.val_windows)
            for n in [self.data.seq_len, *self.tcfg.extra_eval_seq_lens]
        }

        self.model = H64LMForCausalLM(self.mcfg).to(d.device)
        self.precision = resolve_precision(self.hw.precision, d.device)
        self.optimizer = build_optimizer(self.model, self.ocfg, d.device)
        self.scheduler = build_scheduler(self.optimizer, self.ocfg, self.tcfg.max_steps)
        self.scaler = self.precision.grad_scaler()
        self.checkpoints = CheckpointManager(self.run_dir, self.tcfg.keep_last)
        self.step, self.tokens_seen, self.skipped_steps, self.bad_in_a_row = 0, 0, 0, 0
        self.history, self.wandb_run_id = History(), None
        if resume_state is not None:
            self._restore(resume_state)

        # Applied from outside the model: DDP, then compilation of the wrapped module.
        self.train_model = self.model
        if d.enabled:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        if self.hw.compile:
            self.train_model = torch.compile(self.train_model)

        self.tokens_per_step = self.tcfg.batch_size * self.tcfg.grad_accum * self.data.seq_len * d.world_size
        self.flops_per_token = flops_per_token(self.mcfg, self.data.seq_len)
        self.peak = peak_flops(d.device, self.hw.peak_tflops) if d.is_main else None

    # ----------------------------------------------------------------------------- resume
    def _find_resume_state(self) -> dict[str, Any] | None:
        resume, ckpt_dir = self.tcfg.resume, self.run_dir / "checkpoints"
        if resume is None:
            if any(ckpt_dir.glob("*.pt")):
                raise ConfigError(
                    f"{self.run_dir} already holds checkpoints; set train.resume=auto to continue "
                    "that run, or choose a new hydra.run.dir (nothing was overwritten)"
                )
            return None
        if resume == "auto":
            path = find_resume_checkpoint(ckpt_dir, log=self.log)
            if path is None:
                self.log(f"resume=auto: no valid checkpoint in {ckpt_dir}; starting from step 0")
                return None
        else:
            path = resolve_checkpoint_path(resume)
        sidecar = path.with_name(path.name + ".sha256")
        if not sidecar.exists():
            self.log(f"warning: {path} has no checksum file; loading it unverified")
        state = load_checkpoint(path, verify=sidecar.exists())
        self.log(f"resuming from {path} (step {state['step']})")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        saved_model = OmegaConf.create(state["config"]).model
        current = OmegaConf.structured(self.mcfg)
        differing = sorted(k for k in current if k in saved_model and saved_model[k] != current[k])
        if differing:
            raise ConfigError(
                "cannot resume: the checkpoint's model differs in "
                + ", ".join(f"model.{k} ({saved_model[k]} -> {current[k]})" for k in differing)
            )
        load_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.history = History(state["history"])
        self.wandb_run_id = state.get("wandb_run_id")

    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "overrides": list(self.overrides),
            "history": self.history.data,
            "skipped_steps": self.skipped_steps,
            "wandb_run_id": self.wandb_run_id,
        }

    def save(self) -> Path:
        path = self.checkpoints.save(self.state_dict(), self.step)
        self.log(f"step {self.step}: saved {path.name}")
        return path

    # ----------------------------------------------------------------------------- one step
    def train_step(self, stop_requested: bool) -> dict[str, Any]:
        """Forward/backward over `grad_accum` micro-batches, then one (possibly skipped) update."""
        accum, d = self.tcfg.grad_accum, self.d
        parts = torch.zeros(4, device=d.device)  # [loss, ce, aux, z] averaged over micro-batches
        loads: dict[int, torch.Tensor] = {}
        dropped: dict[int, torch.Tensor] = {}
        for micro in range(accum):
            x, y = (t.to(d.device, non_blocking=True) for t in self.loader.next_batch())
            sync = micro == accum - 1 or not d.enabled
            with (contextlib.nullcontext() if sync else self.train_model.no_sync()):
                with self.precision.autocast():
                    out = self.train_model(x, labels=y, return_logits=False)
                self.scaler.scale(out.loss / accum).backward()
            parts += torch.stack([out.loss, out.ce, out.aux, out.z]).detach().float() / accum
            for r in out.router:
                loads[r["layer"]] = loads.get(r["layer"], 0) + r["load"].detach().float() / accum
                dropped[r["layer"]] = dropped.get(r["layer"], 0) + r["dropped"].detach().float() / accum

        # One collective carries what every rank must agree on: losses, the bad-step flag, a stop.
        flags = torch.stack([(~torch.isfinite(parts[0])).float(),  # stays on the device: no sync
                             torch.tensor(float(stop_requested), device=d.device)])
        layer_ids = sorted(loads)
        packed = torch.cat([parts, flags] + [torch.cat([loads[i], dropped[i].view(1)]) for i in layer_ids])
        if d.enabled:
            torch.distributed.all_reduce(packed)
            packed[:4] /= d.world_size
            packed[6:] /= d.world_size
        values = packed.tolist()  # the step's one device -> host copy
        bad_loss, stop = values[4] > 0, values[5] > 0

        self.scaler.unscale_(self.optimizer)
        clip = self.ocfg.grad_clip if self.ocfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if self.precision.name == "fp16":
            # The scaler skips updates whose gradients overflowed and lowers its scale: routine in
            # fp16, not a bad step. A non-finite loss is.
            bad = bad_loss
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            bad = bad_loss or not math.isfinite(grad_norm)
            if not bad:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.skipped_steps += int(bad)
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0

        record = {"step": self.step, "tokens": self.tokens_seen}
        record.update(zip(("loss", "ce", "aux", "z"), values[:4]))
        record.update(lr=lr, grad_norm=grad_norm, skipped_steps=self.skipped_steps)
        offset, n_exp = 6, self.mcfg.num_experts
        record["router"] = {}
        for i in layer_ids:
            load = values[offset : offset + n_exp]
            record["router"][str(i)] = {
                "load": [round(v, 5) for v in load],
                "dropped": values[offset + n_exp],
                "load_max_over_mean": max(load) * n_exp,
            }
            offset += n_exp + 1
        record["_stop"] = stop
        return record

    # ----------------------------------------------------------------------------- evaluation
    def evaluate_and_sample(self, train_loss: float, sink: WandbSink) -> dict[str, Any]:
        """Validation loss at the training length (and at `train.extra_eval_seq_lens`), samples."""
        batch = self.tcfg.val_batch_size or self.tcfg.batch_size
        result = {}
        for n, windows in self.val_windows.items():
            loss, ppl = evaluate(self.model, windows, batch, self.precision, self.d)
            suffix = "" if n == self.data.seq_len else f"_len{n}"
            result[f"val_loss{suffix}"], result[f"val_ppl{suffix}"] = loss, ppl
        val_loss, val_ppl = result["val_loss"], result["val_ppl"]
        lr = self.scheduler.get_last_lr()[0]
        self.history.add(step=self.step, tokens=self.tokens_seen, train_loss=train_loss,
                         val_loss=val_loss, val_ppl=val_ppl, learning_rate=lr)
        if self.d.is_main:
            self.history.save(self.run_dir / "training_history.json")
            if self.tcfg.sample_tokens and self.tcfg.sample_prompts:
                prompts = list(self.tcfg.sample_prompts)
                with self.precision.autocast():
                    texts = sample_continuations(
                        self.model, self.tokenizer, prompts, self.tcfg.sample_tokens, self.d.device,
                        temperature=self.gcfg.temperature, top_k=self.gcfg.top_k, top_p=self.gcfg.top_p,
                        repetition_penalty=self.gcfg.repetition_penalty, seed=self.gcfg.seed,
                    )
                with open(self.run_dir / "samples.txt", "a") as f:
                    f.write(f"## step {self.step}  val_loss {val_loss:.4f}\n")
                    f.writelines(f"{p!r} -> {t!r}\n" for p, t in zip(prompts, texts))
                result["samples"] = dict(zip(prompts, texts))
        return result

    # ----------------------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        d, t = self.d, self.tcfg
        if d.is_main:
            n_total = count_parameters(self.model)
            n_active = active_parameters_per_token(self.mcfg)
            self.log(f"model: {n_total / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active per token; "
                     f"{self.tokens_per_step} tokens per step on {d.world_size} process(es), "
                     f"{self.precision.name} on {d.device.type}")
        resumed_at = self.step if self.step else None
        metrics = MetricsFile(self.run_dir / "metrics.jsonl", resume_step=resumed_at) if d.is_main else None
        sink = WandbSink(self.lcfg, self.run_dir, OmegaConf.to_container(self.cfg, resolve=True),
                         self.overrides, wandb_group(self.lcfg, self.cfg.experiment_name, self.sweep_dir),
                         run_id=self.wandb_run_id) if d.is_main else WandbSink.disabled()
        self.wandb_run_id = sink.run_id
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not d.is_main, dynamic_ncols=True)
        losses_since_eval: list[float] = []
        summary: dict[str, Any] = {}
        exit_code, state = 1, "failed"
        self._write_status("running")
        try:
            with SignalFlag() as signals:
                while self.step < t.max_steps:
                    start = time.perf_counter()
                    record = self.train_step(stop_requested=bool(signals.signum))
                    if d.device.type == "cuda":
                        torch.cuda.synchronize(d.device)
                    elapsed = time.perf_counter() - start
                    stop = record.pop("_stop")
                    record["tokens_per_s"] = self.tokens_per_step / elapsed
                    record["step_time_s"] = elapsed
                    if self.peak:
                        record["mfu"] = self.flops_per_token * record["tokens_per_s"] / self.peak
                    record["mem_gb"] = _memory_gb(d.device)
                    losses_since_eval.append(record["loss"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

                    if self.bad_in_a_row >= t.max_bad_steps:
                        path = self.save()
                        raise TrainingDiverged(
                            f"loss or gradients were NaN/Inf for {self.bad_in_a_row} steps in a row "
                            f"(step {self.step}); saved the last good weights in {path}. Lower optim.lr, "
                            "raise optim.warmup_steps, keep optim.grad_clip on, or use "
                            "hardware.precision=bf16 instead of fp16, then resume with train.resume=auto"
                        )
                    finite = [v for v in losses_since_eval if math.isfinite(v)]
                    is_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                    if is_eval:
                        ev = self.evaluate_and_sample(sum(finite) / max(1, len(finite)), sink)
                        record.update({k: v for k, v in ev.items() if k.startswith("val_")})
                        losses_since_eval.clear()
                        self.log(f"step {self.step}: train {record['loss']:.4f}  val {ev['val_loss']:.4f}  "
                                 f"ppl {ev['val_ppl']:.1f}")
                    if d.is_main and (self.step % t.log_every == 0 or is_eval):
                        metrics.write(record)
                        sink.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
                    saved = None
                    if self.step % t.save_every == 0 or self.step == t.max_steps or stop:
                        saved = self.save() if d.is_main else self.checkpoints.step_path(self.step)
                    if is_eval and d.is_main and record["val_loss"] <= self.history.best_val_loss():
                        self.checkpoints.save_best(self.state_dict(), self.step)
                        save_weights(self.model, self.run_dir / "best_model.safetensors")
                    if stop:
                        if d.enabled:  # peers must not exit while rank 0 is still writing
                            torch.distributed.barrier()
                        raise TrainingStopped(signals.signum or signal.SIGTERM, saved)
            exit_code, state = 0, "finished"
            summary = self._finish(sink, metrics)
            return summary
        except TrainingStopped:
            state = "stopped"
            raise
        except TrainingDiverged:
            state = "diverged"
            raise
        finally:
            self._write_status(state)
            bar.close()
            if metrics is not None:
                metrics.close()
            sink.finish(exit_code=exit_code)

    def _write_status(self, state: str) -> None:
        """`status.json`: running / finished / stopped / diverged / failed, for sweep reports."""
        if self.d.is_main:
            status = {"state": state, "step": self.step, "pid": os.getpid(), "host": socket.gethostname(),
                      "time": time.time()}
            (self.run_dir / "status.json").write_text(json.dumps(status))

    def _finish(self, sink: WandbSink, metrics: MetricsFile | None) -> dict[str, Any]:
        history = self.history.data
        summary = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "best_val_loss": self.history.best_val_loss(),
            "final_val_loss": history["val_loss"][-1] if history["val_loss"] else None,
            "final_val_ppl": history["val_ppl"][-1] if history["val_ppl"] else None,
            "first_val_loss": history["val_loss"][0] if history["val_loss"] else None,
            "skipped_steps": self.skipped_steps,
            "parameters": count_parameters(self.model),
            "active_parameters": active_parameters_per_token(self.mcfg),
        }
        if self.d.is_main:
            plot_run(self.run_dir, read_metrics(self.run_dir / "metrics.jsonl"), self.history)
            sink.summary(summary)
        return summary
