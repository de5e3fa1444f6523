"""Evaluation-time callbacks: validation loss, routing snapshots, samples, downstream tasks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from h64lm.eval import LOCAL_TASKS, downstream_metrics, validation
from h64lm.eval.samples import sample_continuations
from h64lm.model.moe import routing_snapshot
from h64lm.model.moe.stats import top1_changed
from h64lm.train.callbacks.base import Callback
from h64lm.validation import check

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["ValidationLoss", "RoutingSnapshots", "Sampling", "Downstream"]


class ValidationLoss:
    """Validation loss at the training length and `train.extra_eval_seq_lens` (pretraining
    windows), over the stage's validation batches (SFT) or by the stage's own `validate`
    (preference and RL stages), then the history. Run by the trainer before the `Callback`s:
    best checkpoints and the history depend on it."""

    def __call__(self, trainer: "Trainer", record: dict[str, Any], step_losses: list[float]) -> bool:
        run = trainer.run
        batch = run.train.val_batch_size or run.train.batch_size
        if trainer.stage_validate is not None:  # the stage's own metrics (preference, rewards)
            out = trainer.stage_validate(trainer)
            if out is None:
                return False
            record.update(out)
        elif trainer.val_batches is not None:
            out = validation.evaluate_batches(trainer.model, trainer.val_batches, trainer.precision, trainer.d,
                                              trainer.stop_requested)
            if out is None:
                return False
            record["val_loss"], record["val_ppl"] = out
        for n, windows in trainer.val_windows.items():
            out = validation.evaluate(trainer.model, windows, batch, trainer.precision, trainer.d,
                                      trainer.stop_requested)
            if out is None:  # a stop signal arrived (checked between batches)
                return False
            suffix = "" if n == run.data.seq_len else f"_len{n}"
            record[f"val_loss{suffix}"], record[f"val_ppl{suffix}"] = out
        finite = [v for v in step_losses if math.isfinite(v)]
        mean_loss = sum(finite) / len(finite) if finite else math.nan
        trainer.history.add(step=trainer.step, tokens=trainer.tokens_seen, train_loss=mean_loss,
                            val_loss=record["val_loss"], val_ppl=record.get("val_ppl", math.nan),
                            learning_rate=record["lr"])
        if trainer.d.is_main:
            trainer.history.save(trainer.run_dir / "training_history.json")
            trainer.log(f"step {trainer.step}: train loss {record['loss']:.4f} (this step), {mean_loss:.4f} "
                        f"(mean since last eval)  val {record['val_loss']:.4f}"
                        + (f"  ppl {record['val_ppl']:.1f}" if "val_ppl" in record else ""))
        return True


class RoutingSnapshots(Callback):
    """Per-layer expert loads, router entropy and routing changes on 8 fixed validation rows (MoE
    models): `top1_changed` against the previous evaluation and, with `against_start` (every
    stage but pretraining), `top1_changed_from_start` against the model before its first step.
    That reference is kept in RUN/routing_start.safetensors and the previous evaluation's top-1
    experts in each checkpoint, so a resumed run compares with the same ones."""

    def __init__(self, against_start: bool = False) -> None:
        self.last: dict[str, Any] | None = None
        self.against_start = against_start
        self.start: dict[int, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        # the previous evaluation's top-1 experts [N] per layer: the first evaluation after a
        # resume reports top1_changed against them, as the uninterrupted run does
        return {} if self.last is None else {"top1": {str(i): t.cpu() for i, t in self.last["top1"].items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "top1" in state:
            self.last = {"top1": {int(i): t for i, t in state["top1"].items()}}

    @staticmethod
    def _windows(trainer: "Trainer") -> torch.Tensor:
        if trainer.val_batches is not None:  # packed validation rows: the first 8
            windows = torch.cat([b.input_ids for b in trainer.val_batches])[:8]  # [8, T]
        else:
            windows = trainer.val_windows[trainer.run.data.seq_len][:8, :-1]  # [8, T] fixed tokens
        return windows.to(trainer.d.device)

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self.last is not None:  # restored from a checkpoint, on the CPU
            self.last["top1"] = {i: t.to(trainer.d.device) for i, t in self.last["top1"].items()}
        if not self.against_start:
            return
        from safetensors.torch import load_file, save_file

        path = trainer.run_dir / "routing_start.safetensors"
        if trainer.step > 0 and path.is_file():
            self.start = {int(k): v.to(trainer.d.device) for k, v in load_file(path).items()}
            return
        # collective under sharded weights: every rank runs it
        self.start = routing_snapshot(trainer.model, self._windows(trainer).split(4))["top1"]
        if trainer.d.is_main:
            save_file({str(i): t.cpu().contiguous() for i, t in self.start.items()}, path)

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        self.last = routing_snapshot(trainer.model, self._windows(trainer).split(4), previous=self.last)
        if self.start is not None:
            for i, top1 in self.last["top1"].items():
                self.last["layers"][str(i)]["top1_changed_from_start"] = top1_changed(self.start[i], top1)
        record["routing"] = self.last["layers"]
        return True


class Sampling(Callback):
    """Continuations of `train.sample_prompts`, appended to samples.txt and printed (rank 0)."""

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        t, g, d = trainer.run.train, trainer.run.gen, trainer.d
        # sharded weights: every rank generates in step (same prompts and seed), rank 0 writes
        if not ((d.is_main or trainer.layout.sharded) and t.sample_tokens and t.sample_prompts):
            return True
        if trainer.any_stop_requested():
            return True
        prompts = list(t.sample_prompts)
        trainer.log(f"step {trainer.step}: sampling {t.sample_tokens} tokens for {len(prompts)} prompts")
        with trainer.precision.autocast():
            texts = sample_continuations(
                trainer.model, trainer.tokenizer, prompts, t.sample_tokens, d.device,
                temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                repetition_penalty=g.repetition_penalty, seed=g.seed)
        if d.is_main:
            with open(trainer.run_dir / "samples.txt", "a") as f:
                f.write(f"## step {trainer.step}\n")
                f.writelines(f"{text!r}\n" for text in texts)
            for text in texts:
                trainer.log(f"  sample: {text!r}")
        return True


class Downstream(Callback):
    """The local lm-eval tasks on rank 0 every `train.downstream_every` steps and at the last:
    record["downstream/<task>/<metric>"]. Each task holds `train.downstream_limit` examples."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """On every rank, before the first step: too little validation text for the tasks is one
        line now, not a failure after the whole run has trained."""
        from h64lm.eval.downstream import validation_text
        from h64lm.eval.local_tasks import passages

        limit = trainer.run.train.downstream_limit
        found = len(passages(validation_text(trainer.tokenizer, trainer.val_tokens)))
        check(found >= limit, f"train.downstream_every: the validation text has {found} usable sentences "
              f"for the local tasks, fewer than train.downstream_limit={limit}; lower train.downstream_limit "
              "or give more validation text (data.val_path, data.val_fraction)")

    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> bool:
        t = trainer.run.train
        if not (trainer.step % t.downstream_every == 0 or trainer.step == t.max_steps):
            return True
        if not trainer.d.is_main or trainer.stop_requested():
            return True
        metrics = downstream_metrics(trainer.model, trainer.tokenizer, list(LOCAL_TASKS), trainer.val_tokens,
                                     trainer.run_dir / "downstream", str(trainer.d.device),
                                     t.val_batch_size or t.batch_size, limit=t.downstream_limit,
                                     local_examples=t.downstream_limit)
        flat = {f"downstream/{task}/{k}": v for task, m in metrics.items() for k, v in m.items()}
        trainer.log(f"step {trainer.step}: " + "  ".join(
            f"{k.split('/', 1)[1]} {v:.3f}" for k, v in flat.items() if k.endswith(("/acc", "/word_perplexity"))))
        record.update(flat)
        return True
