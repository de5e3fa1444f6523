"""Faults around the Hugging Face round trip, shared by experiments/faults.py and
tests/faults/test_hf_faults.py.

  round trip  `mode=export` of the reference run, then `train.init_from=hf:DIR` with no model keys:
              the folder holds the run's weights bit for bit and the new run starts from them
  damaged     the export truncated, its config.json a JSON list, its weights deleted, a tensor of
              the wrong shape: the launch fails in one line naming train.init_from and the file,
              before training
  export into a file and a non-empty folder that is not an export: refused in one line, nothing
              changed; `export.overwrite=true` replaces the folder; an earlier export is replaced

Each trial returns an `Outcome` (experiments/run_faults.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from experiments.run_faults import Outcome, quiet_run, snapshot

__all__ = ["hf_trials"]


def _export(reference: Path, out: Path, extra: list[str] = ()) -> str:
    return quiet_run(["mode=export", f"checkpoint={reference}", f"out={out}", *extra], out.parent / "export_run")


def _refused(args: list[str], run_dir: Path, *named: str) -> tuple[bool, str]:
    """(the launch raised one ValueError line naming every `named`, that line)."""
    try:
        quiet_run(args, run_dir)
    except ValueError as e:
        line = str(e)
        return "\n" not in line and all(n in line for n in named), line
    return False, "not refused"


def _round_trip(folder: Path, base: list[str], reference: Path) -> Outcome:
    from h64lm.hf import load_hf_model
    from h64lm.runtime.checkpoint import load_trained_model

    out = folder / "hf"
    printed = _export(reference, out)
    record = json.loads((out / "h64lm_export.json").read_text())
    ours, _ = load_trained_model(reference, torch.device("cpu"))
    back = load_hf_model(out)
    same = all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    data = [o for o in base if not o.startswith("model")]
    log = quiet_run(data + [f"train.init_from=hf:{out}", "train.max_steps=1"], folder / "init")
    started = "train.init_from: weights of" in log
    ok = same and started and record["step"] == 8 and "(step 8)" in printed
    return Outcome(ok, f"export of step {record['step']} as {record['architecture']}: weights equal {same}, "
                       f"init_from with no model keys starts from them {started}")


def _damaged(folder: Path, base: list[str]) -> list[Outcome]:
    from safetensors.torch import load_file, save_file

    def wrong_shape(d: Path) -> None:
        path = d / "model.safetensors"
        state = load_file(str(path))
        name = next(k for k in state if "experts" in k)
        state[name] = torch.zeros(2, 3)
        save_file(state, str(path), metadata={"format": "pt"})

    damages = {
        "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-999]),
                      "model.safetensors"),
        "config.json a list": (lambda d: (d / "config.json").write_text("[]"), "config.json"),
        "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
        "wrong shape": (wrong_shape, "experts"),
    }
    data = [o for o in base if not o.startswith("model")]
    outcomes = []
    for name, (damage, named) in damages.items():
        d = folder / name.replace(" ", "_")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(folder / "hf", d)
        damage(d)
        run_dir = folder / f"run_{d.name}"
        ok, line = _refused(data + [f"train.init_from=hf:{d}"], run_dir, "train.init_from=hf:", named)
        trained = (run_dir / "checkpoints").exists()
        outcomes.append(Outcome(ok and not trained, f"{name}: {line[:80] if ok else line}"))
    return outcomes


def _export_targets(folder: Path, reference: Path) -> list[Outcome]:
    outcomes = []
    a_file = folder / "a_file"
    a_file.write_text("keep me")
    ok, line = _refused(["mode=export", f"checkpoint={reference}", f"out={a_file}"], folder / "x", "is a file")
    outcomes.append(Outcome(ok and a_file.read_text() == "keep me", f"out=a file: {line[:60]}"))

    foreign = folder / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    ok, line = _refused(["mode=export", f"checkpoint={reference}", f"out={foreign}"], folder / "y",
                        "export.overwrite=true")
    outcomes.append(Outcome(ok and snapshot(foreign) == before, f"non-empty folder: {line[:60]}"))
    _export(reference, foreign, ["export.overwrite=true"])
    replaced = not (foreign / "notes.txt").exists() and (foreign / "h64lm_export.json").is_file()
    outcomes.append(Outcome(replaced, f"export.overwrite=true replaces it: {replaced}"))

    again = folder / "hf"  # the round trip's export: an earlier export is replaced without a switch
    record = (again / "h64lm_export.json").stat().st_mtime_ns
    _export(reference, again)
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".hf.")]
    newer = (again / "h64lm_export.json").stat().st_mtime_ns > record
    outcomes.append(Outcome(newer and not leftovers, f"earlier export replaced: {newer}, leftovers {leftovers}"))
    return outcomes


def hf_trials(folder: Path, base: list[str], reference: Path) -> list[Outcome]:
    """Every trial above; `reference` is an 8-step run of `base` (experiments/faults.py's)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [_round_trip(folder, base, reference)] + _damaged(folder, base) + _export_targets(folder, reference)
