"""The preference stages: `stage=reward` (a Bradley-Terry reward model) and `stage=dpo` (DPO / IPO).

Both train on preference pairs (h64lm/data/preference_batches.py: rows 2i / 2i + 1 = pair i's
chosen / rejected conversation) through the same trainer as pretraining and SFT, and validate on
every held-out pair once: `val_loss` is the held-out pair loss (BT or DPO), `val/<metric>` the
held-out means of the objective's TRL-named metrics (`val/rewards/accuracies` is the reward
model's pairwise accuracy and DPO's implicit-reward accuracy).

DPO's reference is the starting policy (`build_reference`: `train.init_from`, or the same seeded
initialisation without it), frozen, run on each micro-batch before the policy; or, with
`stage.precompute_reference=true`, its log-probs of every train and validation pair computed once
at the start, with the policy itself before its first step (which IS the starting policy), and
kept in RUN/reference_logps.safetensors so a resumed run reads the same numbers
(`PrecomputedReference`). Train pairs are scored in train() mode and validation pairs in eval()
mode, as the policy is in each; with a training capacity factor the tokens an expert drops depend
on the batch, so the two switches then differ slightly (dropless routing: equal to rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from h64lm.config import RunConfig
from h64lm.data import Tokenizer
from h64lm.data.batch import Batch
from h64lm.data.preference_batches import PreferenceLoader, build_preference_data, preference_batches
from h64lm.eval.validation import sharded_sums
from h64lm.objectives.pairwise import DirectPreference, RewardModelling, chosen_nll, pair_scores, reference_logprobs
from h64lm.objectives.preference import DPO_REDUCTION, bradley_terry_loss
from h64lm.runtime.distributed import Dist
from h64lm.train.callbacks.base import Callback
from h64lm.train.reference import build_reference
from h64lm.train.stage import Stage

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["PrecomputedReference", "ReferenceTable", "dpo_stage", "reward_stage"]

REFERENCE_FILE = "reference_logps.safetensors"
# TRL's names, as bradley_terry_loss / dpo_loss return them
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
DPO_METRICS = REWARD_METRICS + ("logps/chosen", "logps/rejected")


def _data(run: RunConfig, d: Dist) -> tuple[PreferenceLoader, list[Batch]]:
    t = run.train
    loader, val_batches, skipped = build_preference_data(run.data, t.batch_size, t.val_batch_size or t.batch_size,
                                                         t.seed, d.rank, d.world_size)
    if skipped and d.is_main:
        print(f"data={run.data.name}: left out {skipped}", flush=True)
    return loader, val_batches


def reward_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """The Bradley-Terry loss on the scalar head's rewards of chosen vs rejected answers."""
    loader, val_batches = _data(run, d)

    def pair_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return bradley_terry_loss(*pair_scores(model(batch.input_ids, return_logits=False), batch))

    return Stage(loader, RewardModelling(run.model), None, val_batches,
                 validate=lambda trainer: validate_pairs(trainer, val_batches, REWARD_METRICS, pair_losses))


class ReferenceTable:
    """The reference log-probs [N, 2] (chosen, rejected) of every train and validation pair,
    filled once by `PrecomputedReference`; called with a batch -> its pairs' rows [P, 2]."""

    def __init__(self, loader: PreferenceLoader, val_batches: list[Batch], reduction: str):
        self.loader, self.val_batches, self.reduction = loader, val_batches, reduction
        self.train: Optional[torch.Tensor] = None  # [N, 2]
        self.val: Optional[torch.Tensor] = None  # [N_val, 2]

    def __call__(self, batch: Batch, split: str = "train") -> torch.Tensor:
        table = self.train if split == "train" else self.val
        if table is None:
            raise RuntimeError("stage.precompute_reference=true: the reference log-probs were never computed; "
                               "the trainer's PrecomputedReference callback computes them before the first step")
        return table[batch.extras["pair"][0::2]]

    def compute(self, model: nn.Module, device: torch.device, autocast: Callable) -> None:
        """Score every pair with `model` (train pairs in train(), validation pairs in eval())."""
        was_training = model.training
        rows, width, size = self.loader.rows, self.loader.width, self.loader.batch_size
        train_batches = [preference_batches(rows, list(range(i, min(i + size, len(rows)))), width)
                         for i in range(0, len(rows), size)]
        tables = []
        for batches, training in ((train_batches, True), (self.val_batches, False)):
            model.train(training)
            tables.append(torch.cat([reference_logprobs(model, b.to(device), self.reduction, autocast)
                                     for b in batches]))
        model.train(was_training)
        self.train, self.val = tables

    def metadata(self) -> dict[str, str]:
        return {"pairs": self.loader.fingerprint, "reduction": self.reduction}


class PrecomputedReference(Callback):
    """Fills the DPO objective's `ReferenceTable` before the first step of each launch: read from
    RUN/reference_logps.safetensors when an earlier launch wrote it, else computed with the policy
    at step 0 (the starting policy), or with a rebuilt reference when a resumed run lost the file.
    Every rank computes every pair (under sharded weights each forward is a collective)."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import save_file

        table = getattr(trainer.objective, "reference", None)
        if not isinstance(table, ReferenceTable):
            return
        path, device = trainer.run_dir / REFERENCE_FILE, trainer.d.device
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    saved = f.metadata()
                    if saved != table.metadata():
                        raise ValueError(f"{path} holds reference log-probs of other pairs or stage.loss_type "
                                         f"({saved} vs {table.metadata()}); restore data.* and stage.loss_type "
                                         "as the run started")
                    table.train, table.val = f.get_tensor("train").to(device), f.get_tensor("val").to(device)
                return
            except (SafetensorError, OSError) as e:  # damaged: derivable, so computed again below
                trainer.log(f"{path.name} is unreadable ({e}); computing the reference log-probs again")
        if trainer.step == 0:
            table.compute(trainer.model, device, trainer.precision.autocast)
        else:  # the policy has moved on: the starting weights again, from train.init_from
            reference = build_reference(trainer.run, trainer.d, trainer.log)
            table.compute(reference, device, trainer.precision.autocast)
            del reference
        trainer.log(f"reference log-probs of {len(table.train)} train and {len(table.val)} validation pairs "
                    f"-> {path.name}")
        if trainer.d.is_main:
            partial = path.with_suffix(".partial")
            save_file({"train": table.train.cpu(), "val": table.val.cpu()}, str(partial), table.metadata())
            partial.replace(path)


def dpo_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """`dpo_loss` of the policy against the frozen starting policy (run now, or precomputed)."""
    s = run.stage
    loader, val_batches = _data(run, d)
    reduction = DPO_REDUCTION[s.loss_type]
    if s.precompute_reference:
        table = ReferenceTable(loader, val_batches, reduction)
        reference, val_reference = table, (lambda batch: table(batch, "val"))
    else:
        frozen = build_reference(run, d, print if d.is_main else (lambda _: None))

        def reference(batch: Batch) -> torch.Tensor:
            return reference_logprobs(frozen, batch, reduction)

        def val_reference(batch: Batch) -> torch.Tensor:
            frozen.eval()  # as the policy is during validation
            try:
                return reference_logprobs(frozen, batch, reduction)
            finally:
                frozen.train()

    objective = DirectPreference(run.model, s.beta, s.loss_type, s.label_smoothing, reference, s.rpo_alpha)

    def pair_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ref = val_reference(batch)
        out = model(batch.input_ids, labels=batch.labels, return_logits=False, token_logprobs=True)
        loss, metrics = objective.losses(out, batch, ref)
        if s.rpo_alpha:
            nll, tokens = chosen_nll(out, batch)
            metrics.update(nll_sum=nll.item(), nll_tokens=float(tokens))
        return loss, metrics

    return Stage(loader, objective, None, val_batches,
                 validate=lambda trainer: validate_pairs(trainer, val_batches, DPO_METRICS, pair_losses, s.rpo_alpha))


@torch.no_grad()
def validate_pairs(trainer: "Trainer", batches: list[Batch], names: tuple[str, ...],
                   pair_losses: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
                   rpo_alpha: float = 0.0) -> Optional[dict[str, Any]]:
    """{"val_loss": mean pair loss, "val/<name>": mean over pairs of each metric in `names`} of
    every held-out pair, the model in eval(); rank r takes batches r, r + W, ... (`sharded_sums`:
    under sharded weights every rank runs as many forwards, repeating one uncounted). None when a
    stop was requested. With rpo_alpha > 0 (DPO + NLL) `pair_losses` also gives each batch's
    chosen-token NLL sum and count (`nll_sum`, `nll_tokens`): `val/nll_loss` is the per-token mean
    over every held-out chosen answer, `val/pair_loss` the DPO loss and `val_loss` the objective,
    DPO + rpo_alpha x NLL, as in training."""
    d, model = trainer.d, trainer.model
    shard = batches[d.rank::d.world_size]
    totals = ("nll_sum", "nll_tokens") if rpo_alpha else ()

    def sums(i: int, counted: bool) -> torch.Tensor:  # [loss, metrics..., 1] x pairs, then the totals
        batch = (shard[i] if counted else batches[0]).to(d.device)
        with trainer.precision.autocast():
            loss, metrics = pair_losses(model, batch)
        pairs = batch.input_ids.shape[0] // 2 if counted else 0
        return torch.tensor([*(pairs * v for v in (loss.item(), *(metrics[n] for n in names), 1.0)),
                             *(metrics[n] * counted for n in totals)], dtype=torch.float64, device=d.device)

    width = len(names) + 2
    total = sharded_sums(model, len(batches), len(shard), 1, d, trainer.stop_requested, width + len(totals), sums)
    if total is None:
        return None
    count = total[width - 1].clamp(min=1)
    result = {"val_loss": float(total[0] / count),
              **{f"val/{name}": float(total[1 + k] / count) for k, name in enumerate(names)}}
    if rpo_alpha:
        nll = float(total[width] / total[width + 1].clamp(min=1))
        result.update({"val_loss": result["val_loss"] + rpo_alpha * nll, "val/pair_loss": result["val_loss"],
                       "val/nll_loss": nll})
    return result
