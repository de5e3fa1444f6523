"""What `python run.py` does with a composed config: train, eval or generate.

Exit codes: 0 done; 2 bad configuration or input (one line on stderr says which option to
change); 3 training diverged (NaN/Inf, last good state saved); 4 a checkpoint could not be
written or trusted; 5 another process of a DDP job died; 128 + N stopped by signal N after
saving a checkpoint (130 SIGINT, 143 SIGTERM). `HYDRA_FULL_ERROR=1` shows the full traceback
instead of the one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from h64lm.config import ConfigError, validate_run
from h64lm.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path
from h64lm.train.distributed import Dist, broadcast_object, init_distributed

__all__ = ["main", "run", "load_trained_model"]

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_CHECKPOINT, EXIT_PEER = 2, 3, 4, 5


def _hydra_run_info() -> tuple[Path, list[str], str | None]:
    hc = HydraConfig.get()
    sweep_dir = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
    return Path(hc.runtime.output_dir), list(hc.overrides.task), sweep_dir


def main(cfg: DictConfig) -> float | None:
    """Hydra's task function: run, turning expected failures into one line and an exit code."""
    from h64lm.train.control import TrainingDiverged, TrainingStopped

    try:
        run_dir, overrides, sweep_dir = _hydra_run_info()
        return run(cfg, run_dir, overrides, sweep_dir)
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        codes = [
            (TrainingStopped, 128 + getattr(e, "signum", 15)),
            (TrainingDiverged, EXIT_DIVERGED),
            (CheckpointError, EXIT_CHECKPOINT),
            (PeerFailure, EXIT_PEER),
            ((ConfigError, ValueError, FileNotFoundError, PermissionError), EXIT_BAD_INPUT),
        ]
        for kinds, code in codes:
            if isinstance(e, kinds):
                print(f"error: {e}" if code < 128 else str(e), file=sys.stderr, flush=True)
                sys.exit(code)
        raise


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep_dir: str | None = None) -> Any:
    """One run without Hydra's runtime (tests call this directly)."""
    parts = validate_run(cfg)  # every key checked before anything expensive happens
    d = init_distributed(parts["hardware"])
    try:
        run_dir = Path(broadcast_object(str(run_dir), d))
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.mode == "train":
            from h64lm.train.loop import Trainer

            summary = Trainer(cfg, parts, run_dir, overrides, d, sweep_dir).fit()
            if d.is_main:
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            return summary["best_val_loss"]
        if cfg.mode == "eval":
            return _evaluate_checkpoint(cfg, parts, run_dir, overrides, d)
        return _generate(cfg, parts, run_dir, d)
    except RuntimeError as e:
        if d.enabled and _is_peer_failure(e):
            raise PeerFailure(
                f"another process of this job failed ({str(e).strip().splitlines()[0][:120]}); "
                "rerun the job with train.resume=auto to continue from the last checkpoint"
            ) from e
        raise
    finally:
        d.shutdown()


class PeerFailure(RuntimeError):
    """A collective failed because another rank died; this rank's state is not at fault."""


def _is_peer_failure(e: RuntimeError) -> bool:
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "timed out", "Timeout")
    )


def load_trained_model(checkpoint: str | Path, device: torch.device):
    """(model, saved run config) from a checkpoint file or a run directory."""
    from h64lm.model import H64LMConfig, H64LMForCausalLM
    from h64lm.train.checkpoint import load_model_state

    path = resolve_checkpoint_path(checkpoint)
    sidecar = path.with_name(path.name + ".sha256")
    state = load_checkpoint(path, verify=sidecar.exists())
    saved = OmegaConf.create(state["config"])
    model = H64LMForCausalLM(H64LMConfig(**OmegaConf.to_container(saved.model, resolve=True)))
    load_model_state(model, state["model"])
    return model.to(device).eval(), saved


def _data_for_eval(cfg: DictConfig, parts: dict, saved: DictConfig, overrides: list[str]):
    """The run's own data unless the command line names other data; a `text` file is read whole."""
    from h64lm.config import to_dataclass
    from h64lm.data import DataConfig

    if not any(o.lstrip("+~").startswith("data") for o in overrides):
        return to_dataclass(saved.data, DataConfig, "data")
    data = parts["data"]
    if data.name == "text" and data.path and not data.val_path:
        data = dataclasses.replace(data, val_path=data.path, val_windows=None)
    return data


def _evaluate_checkpoint(cfg, parts, run_dir: Path, overrides: list[str], d: Dist) -> float:
    from h64lm.data import check_vocab, load_tokenizer, prepare_corpus, validation_windows
    from h64lm.train.evaluate import evaluate
    from h64lm.train.precision import resolve_precision

    model, saved = load_trained_model(cfg.checkpoint, d.device)
    data = _data_for_eval(cfg, parts, saved, overrides)
    tokenizer = load_tokenizer(data)
    check_vocab(tokenizer, model.config.vocab_size)
    corpus = prepare_corpus(data, tokenizer)
    windows = validation_windows(corpus.val, data.seq_len, data.val_windows)
    precision = resolve_precision(parts["hardware"].precision, d.device)
    loss, ppl = evaluate(model, windows, parts["train"].batch_size, precision, d)
    result = {"checkpoint": str(cfg.checkpoint), "data": data.name, "seq_len": data.seq_len,
              "windows": len(windows), "tokens": len(windows) * data.seq_len,
              "val_loss": loss, "val_ppl": ppl}
    if d.is_main:
        print(f"val_loss {loss:.4f}  val_ppl {ppl:.2f}  ({result['tokens']} tokens of {data.name})")
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return loss


def _generate(cfg, parts, run_dir: Path, d: Dist) -> None:
    from h64lm.config import to_dataclass
    from h64lm.data import DataConfig, load_tokenizer
    from h64lm.train.evaluate import sample_continuations

    model, saved = load_trained_model(cfg.checkpoint, d.device)
    tokenizer = load_tokenizer(to_dataclass(saved.data, DataConfig, "data"))
    gen, train = parts["gen"], parts["train"]
    prompts = [cfg.prompt] if cfg.prompt else list(train.sample_prompts)
    lines = []
    for i in range(gen.num_samples):
        texts = sample_continuations(
            model, tokenizer, prompts, gen.max_new_tokens, d.device, temperature=gen.temperature,
            top_k=gen.top_k, top_p=gen.top_p, repetition_penalty=gen.repetition_penalty,
            seed=gen.seed + i,
        )
        lines += [f"{p}{t}" for p, t in zip(prompts, texts)]
    if d.is_main:
        for line in lines:
            print(line + "\n")
        (run_dir / "generations.txt").write_text("\n\n".join(lines) + "\n")
