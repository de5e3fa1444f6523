"""Shared test helpers: compose configs the way run.py does, and run it as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from h64lm.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_configs()

# A few-second training run: the tiny model shrunk further, a short local text corpus.
FAST = [
    "model=tiny",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=32",
    "model.num_experts=4",
    "data.seq_len=32",
    "data.val_windows=4",
    "train.batch_size=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.save_every=3",
    "train.sample_tokens=4",
    "optim.warmup_steps=2",
    "hardware=cpu",
    "logger=none",
]


def compose_cfg(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def text_corpus(tmp_path: Path, paragraphs: int = 400) -> Path:
    """A local .txt corpus of real-looking English, long enough for many 32-token windows."""
    wikitext = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    path = tmp_path / "corpus.txt"
    if wikitext.exists():
        path.write_text(wikitext.read_text()[:120_000])
    else:
        words = "the of and in to a was is for on as by with at from his that an it were".split()
        lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(paragraphs)]
        path.write_text("\n\n".join(lines))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "run.py")] + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def wandb_offline_records(run_dir: Path) -> list[dict]:
    """Every record of the W&B offline run under `run_dir`, read back with W&B's own inspector."""
    import json
    import shutil

    runs = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    assert runs, f"no W&B offline run under {run_dir}/wandb"
    wandb_bin = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run([wandb_bin, "leet", "inspect", "--json", str(runs[-1])],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
