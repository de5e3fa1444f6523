"""The training loop: plain PyTorch, one process or many under torchrun.

One optimizer step = `train.grad_accum` micro-batches of `train.batch_size` sequences per rank.
Every layout (one process, DDP, FSDP, expert parallelism) is built and stepped the same way
(h64lm/parallel); the stage brings the data and the objective (h64lm/train/stage.py), the step
function knows no loss term (h64lm/train/step.py), and everything around the loop (evaluation,
sampling, metrics, W&B, status) is a callback (h64lm/train/callbacks/).
Everything that decides what happens at a step (data windows, learning rate, RNG) is restored
from a checkpoint, so stopping at step k and resuming reproduces the uninterrupted run exactly
(bit for bit on the CPU in fp32).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from h64lm.config import RunConfig, run_config_from_yaml, run_config_yaml
from h64lm.data import check_vocab, load_tokenizer, validation_windows
from h64lm.model import flops_per_token
from h64lm.model.architecture import architecture, architecture_differences
from h64lm.objectives.balancing import RouterBiasUpdate
from h64lm.optim.optimizer import build_optimizer, build_scheduler
from h64lm.parallel import ParallelLayout, clip_grad_norm_
from h64lm.runtime.checkpoint import FORMAT_VERSION, Checkpointer
from h64lm.runtime.control import SignalFlag, TrainingDiverged, TrainingStopped, rng_state, set_rng_state
from h64lm.runtime.distributed import Dist, seed_everything
from h64lm.runtime.precision import resolve_precision
from h64lm.train.callbacks import Callback, ValidationLoss, default_callbacks
from h64lm.train.init_from import adopt_source_architecture, initialize_from
from h64lm.train.metrics import History
from h64lm.train.mfu import peak_flops
from h64lm.train.report import announcement, run_summary, step_record
from h64lm.train.resume import find_resume_state
from h64lm.train.sharded import build_model
from h64lm.train.stage import StageFactory, stage_factory
from h64lm.train.step import StepStats, forward_backward, reduce_stats
from h64lm.validation import ConfigError

__all__ = ["Trainer"]


class Trainer:
    def __init__(self, run: RunConfig, run_dir: Path, overrides: list[str], d: Dist,
                 sweep_dir: str | None = None, log: Callable[[str], None] | None = None,
                 stage: StageFactory | None = None, callbacks: list[Callback] | None = None):
        run = adopt_source_architecture(run, overrides, log or (print if d.is_main else (lambda _: None)))
        self.run, self.run_dir, self.overrides, self.d = run, Path(run_dir), overrides, d
        self.sweep_dir = sweep_dir
        self.log = log or (tqdm.write if d.is_main else (lambda *a, **k: None))
        t, data = run.train, run.data
        self.accum = t.micro_batches_per_step(d.world_size)
        self.layout = ParallelLayout.from_run(run, d.world_size)  # the one check of hardware.*
        resume_state = find_resume_state(t.resume, self.run_dir, t.max_steps, self.log)

        seed_everything(t.seed)
        self.tokenizer = load_tokenizer(data)
        check_vocab(self.tokenizer, run.model.vocab_size)
        built = (stage or stage_factory(run))(run, d, self.tokenizer)  # stage=None: stage.name's
        self.loader, self.objective, self.val_tokens = built.loader, built.objective, built.val_tokens
        self.val_batches, self.stage_validate = built.val_batches, built.validate
        self.val_windows = {} if self.val_tokens is None else {
            n: validation_windows(self.val_tokens, n, data.val_windows) for n in [data.seq_len, *t.extra_eval_seq_lens]}

        self.precision = resolve_precision(run.hardware.precision, d.device)
        init = None
        if resume_state is None and t.init_from:  # on the full model, before it is split
            def init(model: torch.nn.Module) -> None:
                initialize_from(model, t.init_from, t.init_noise_std, t.seed, self.log)
        self.model, self.train_model, fsdp_bf16 = build_model(run, self.layout, d, self.precision, init)
        self.precision = dataclasses.replace(self.precision, autocast_enabled=not fsdp_bf16)
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        if frozen:  # train.freeze / train.trainable, applied when the model was built
            self.log(f"frozen ({len(frozen)} tensors, kept out of the optimizer): {', '.join(frozen[:6])}"
                     + (", ..." if len(frozen) > 6 else ""))
        self.optimizer = build_optimizer(self.model, run.optim, d.device)
        self.scheduler = build_scheduler(self.optimizer, run.optim, t.max_steps)
        self.scaler = self.precision.grad_scaler()
        # aux-loss-free balancing: the one place the trainer reads the rate
        self.bias_update = RouterBiasUpdate(self.model, self.optimizer) if run.model.router_bias_update_rate else None
        self.checkpoints = Checkpointer(self.run_dir, t.keep_last, t.async_save, self.log)
        self.step, self.tokens_seen, self.skipped_steps, self.bad_in_a_row = 0, 0, 0, 0
        self.history, self.wandb_run_id = History(), None
        self.validation = ValidationLoss()
        self.callbacks = default_callbacks(run) if callbacks is None else callbacks
        if resume_state is not None:
            self._restore(resume_state)

        self.flops_per_token = flops_per_token(run.model, data.seq_len)
        self.peak = peak_flops(d.device, run.hardware.peak_tflops) if d.is_main else None
        self.signals: SignalFlag | None = None

    # ----------------------------------------------------------------------------- state
    def _restore(self, state: dict[str, Any]) -> None:
        saved = run_config_from_yaml(state["config"])
        # the architecture only: training-time MoE settings (coefficients, capacity, bias rate,
        # dropout, checkpointing) may change on resume, as they may with train.init_from
        differing = architecture_differences(architecture(saved.model), architecture(self.run.model))
        if differing:
            raise ConfigError("cannot resume: the checkpoint's model differs in " + ", ".join(differing))
        if saved.optim.name != self.run.optim.name:  # their states hold different tensors
            raise ConfigError(f"cannot resume: the checkpoint was trained with optim.name={saved.optim.name}, "
                              f"this run asks for optim.name={self.run.optim.name}; keep the optimizer")
        if saved.train.max_steps != self.run.train.max_steps:
            horizon = self.run.optim.schedule_steps or self.run.train.max_steps
            self.log(f"train.max_steps {saved.train.max_steps} -> {self.run.train.max_steps}: the learning-rate "
                     f"schedule now spans {horizon} steps (lr at step {state['step']}: "
                     f"{self.scheduler.lr_lambdas[0](state['step']) * self.run.optim.lr:.3g}); "
                     f"optim.schedule_steps={saved.train.max_steps} would keep the decayed schedule instead")
        # this rank's extras (its loader position and RNG), whatever layout wrote the checkpoint
        state = {**state, **self.checkpoints.load(Path(state["checkpoint_path"]), self.model, self.optimizer)}
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.history = History(state["history"])
        self.wandb_run_id = state.get("wandb_run_id")
        for cb in self.callbacks:  # checkpoints written before callbacks had state hold none
            cb.load_state_dict(state.get("callbacks", {}).get(type(cb).__name__, {}))

    def state_dict(self) -> dict[str, Any]:
        """This process's whole state as one dict of plain data and tensors: what a one-process
        `.pt` checkpoint of the previous layout held (legacy.py still reads those)."""
        return {**self.extras(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def extras(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and optimizer state (plain data)."""
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "config": run_config_yaml(self.run),
            "overrides": list(self.overrides),
            "history": self.history.data,
            "skipped_steps": self.skipped_steps,
            "wandb_run_id": self.wandb_run_id,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
        }

    def save(self, final: bool = True) -> Path:
        """Collective: every rank writes its shards and extras of the step checkpoint (in the
        background with train.async_save on several processes, unless `final`)."""
        path = self.checkpoints.save(self.model, self.optimizer, self.extras(), self.step, final=final)
        self.log(f"step {self.step}: {'saved' if path.is_dir() else 'saving'} {path.name}/")
        return path

    # ----------------------------------------------------------------------------- one step
    def train_step(self, stop_requested: bool) -> StepStats:
        """Forward/backward over the micro-batches, then one (possibly skipped) update."""
        d = self.d
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        terms, loads, dropped, tokens = forward_backward(
            self.objective, self.train_model, self.model, batches, d.world_size, d.device,
            self.precision.autocast, lambda loss: self.scaler.scale(loss).backward())
        bad_router = self.bias_update.nonfinite() if self.bias_update is not None else None
        stats = reduce_stats(terms, loads, dropped, stop_requested, d.world_size, bad_router)
        stats.tokens = tokens
        if self.bias_update is not None:  # applied by the optimizer's post-step hook, if it steps
            self.bias_update.set_loads({i: torch.tensor(r.load) for i, r in stats.router.items()})

        self.scaler.unscale_(self.optimizer)
        # Sharded gradients live on several meshes; this sums squares where they are sharded. It
        # also serves one process: torch's fp32 CPU norm of a 32k-row embedding gradient is off by
        # ~1e-5 relative from the float64 value, this sum of squares by ~1e-7.
        stats.grad_norm = float(clip_grad_norm_(self.model.parameters(), self.run.optim.grad_clip))
        if self.precision.name == "fp16":
            # The scaler skips updates whose gradients overflowed and lowers its scale: routine in
            # fp16, not a bad step. A non-finite loss is.
            stats.skipped = stats.nonfinite
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            stats.skipped = stats.nonfinite or not math.isfinite(stats.grad_norm)
            if not stats.skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += stats.tokens
        self.skipped_steps += int(stats.skipped)
        self.bad_in_a_row = self.bad_in_a_row + 1 if stats.skipped else 0
        return stats

    # ----------------------------------------------------------------------------- stop requests
    def stop_requested(self) -> bool:
        """Whether this rank received SIGINT/SIGTERM."""
        return self.signals is not None and bool(self.signals.signum)

    def any_stop_requested(self) -> bool:
        """Whether a stop was requested; on every rank alike when the ranks must act in step."""
        if not self.layout.sharded:  # only sharded weights make every rank act at once
            return self.stop_requested()
        flag = torch.tensor(float(self.stop_requested()), device=self.d.device)
        torch.distributed.all_reduce(flag)
        return bool(flag > 0)

    # ----------------------------------------------------------------------------- the run
    def _check_divergence(self) -> None:
        if self.bad_in_a_row >= self.run.train.max_bad_steps:
            path = self.save()
            lr = "optim.muon_lr (and optim.lr)" if self.run.optim.name == "muon" else "optim.lr"
            what = "loss or gradients" + (" or router biases" if self.bias_update else "")
            raise TrainingDiverged(
                f"{what} were NaN/Inf for {self.bad_in_a_row} steps in a row (step {self.step}); saved the last "
                f"good weights in {path}. Lower {lr}, raise optim.warmup_steps, keep optim.grad_clip on, or use "
                "hardware.precision=bf16 instead of fp16, then resume with train.resume=auto")

    def _evaluate(self, record: dict[str, Any], step_losses: list[float]) -> bool:
        """Validation loss and history, then every callback's evaluation; False when a stop
        interrupted it."""
        return (self.validation(self, record, step_losses)
                and all(cb.on_eval(self, record) for cb in self.callbacks))

    def _save_best(self, record: dict[str, Any]) -> None:
        if record["val_loss"] > self.history.best_val_loss():
            return
        self.checkpoints.save_best(self.model, self.optimizer, self.extras(), self.step)  # collective

    def fit(self) -> dict[str, Any]:
        d, t = self.d, self.run.train
        self.log(announcement(self))
        for cb in self.callbacks:
            cb.on_fit_start(self)
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not d.is_main, dynamic_ncols=True)
        step_losses: list[float] = []
        state, summary = "failed", None
        try:
            with SignalFlag() as self.signals:
                while self.step < t.max_steps:
                    start = time.perf_counter()
                    stats = self.train_step(stop_requested=self.stop_requested())
                    if d.device.type == "cuda":
                        torch.cuda.synchronize(d.device)
                    record = step_record(self, stats, time.perf_counter() - start)
                    step_losses.append(stats.loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    self._check_divergence()

                    stop = stats.stop_requested
                    is_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                    if is_eval and not stop:
                        stop = not self._evaluate(record, step_losses)
                        step_losses.clear()
                    for cb in self.callbacks:
                        cb.on_record(self, record, is_eval)
                    if self.step % t.save_every == 0 or self.step == t.max_steps or stop:
                        saved = self.save(final=stop or self.step == t.max_steps)
                    if "val_loss" in record:
                        self._save_best(record)
                    if stop:
                        self._finish_saves()
                        if d.enabled:  # peers must not exit while rank 0 is still writing
                            torch.distributed.barrier()
                        raise TrainingStopped(self.signals.signum or signal.SIGTERM, saved)
            if self.step == self.skipped_steps:
                raise TrainingDiverged(
                    f"no step of this run had a finite loss and gradients ({self.step} skipped); nothing was "
                    "learned. Lower optim.lr or check the data, then train again")
            self._finish_saves()
            state, summary = "finished", run_summary(self)
            return summary
        except TrainingStopped:
            state = "stopped"
            raise
        except TrainingDiverged:
            state = "diverged"
            raise
        finally:
            bar.close()
            for cb in self.callbacks:
                cb.on_fit_end(self, state, summary)

    def _finish_saves(self) -> None:
        self.checkpoints.wait()
