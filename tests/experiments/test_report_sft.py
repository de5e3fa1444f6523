"""The report of an SFT sweep answers "freeze the router or not": per run the final exact match and
the final share of tokens whose top-1 expert moved from the starting model (mean over MoE
layers), per arm their mean and spread over seeds and the paired difference in exact match. The
sweep is written by hand (tests/experiments/run_fixtures.py), shaped like
`python run.py -m experiment=sft 'train.freeze=[],[router]' train.seed=0,1`; the expected numbers
are computed here with numpy from what was written."""

import json

import numpy as np
import pytest

from experiments.report import main as report_main
from experiments.report_runs import find_run_dirs, read_run, summarise
from tests.experiments.run_fixtures import fake_run, make_records, with_keys

FREEZE = ["[]", "[router]"]
SEEDS = ["0", "1"]
LAYERS = ("1", "3")


def _sft_records(seed: int, frozen: bool) -> list[dict]:
    """Trainer-shaped records of an SFT run: evaluations (steps 10..40) carry `sft/exact_match`
    and `routing.<layer>.top1_changed_from_start`; a frozen router moves fewer tokens."""
    rng = np.random.default_rng(seed + 10 * frozen)
    records = make_records(seed, layers=LAYERS)
    for r in records:
        if "val_loss" in r:
            r["sft/exact_match"] = float(rng.uniform(0.2, 0.3) + 0.1 * frozen)
            r["routing"] = {layer: {"router_entropy": 1.0,
                                    "top1_changed_from_start": float(rng.uniform(0.1, 0.2) if frozen
                                                                     else rng.uniform(0.5, 0.8))}
                            for layer in LAYERS}
    return records


def _write_sweep(root, base_config):
    sweep, written = root / "sft", {}
    for job, (freeze, seed) in enumerate((f, s) for f in FREEZE for s in SEEDS):
        records = _sft_records(int(seed), freeze != "[]")
        config = with_keys(base_config, train={"seed": int(seed)})
        fake_run(sweep / str(job), config, ["experiment=sft", f"train.freeze={freeze}", f"train.seed={seed}"],
                 records)
        last = [r for r in records if "val_loss" in r][-1]
        written[str(job)] = (last["sft/exact_match"],
                             np.mean([last["routing"][layer]["top1_changed_from_start"] for layer in LAYERS]))
    return sweep, written


def _cells(table: str) -> list[dict[str, str]]:
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_sft_sweep_report_has_exact_match_and_routing_shift_per_run_and_arm(base_config, tmp_path, capsys):
    sweep, written = _write_sweep(tmp_path, base_config)
    for run_dir in find_run_dirs(sweep):
        row = summarise(read_run(run_dir, sweep))
        exact, changed = written[run_dir.name]
        assert row["final_exact_match"] == exact
        assert row["final_top1_changed_from_start"] == pytest.approx(changed)

    assert report_main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    arms_table, runs_table = (part.split("\n\n", 1)[0] for part in text.split("## Arms\n\n")[1].split("## Runs\n\n"))
    for cells in _cells(runs_table):
        exact, changed = written[cells["run"]]
        assert cells["exact match"] == f"{exact:.3f}"
        assert cells["top-1 changed from start"] == f"{changed:.3f}"

    arms = {c["arm"].strip("*"): c for c in _cells(arms_table)}
    assert sorted(arms) == ["train.freeze=[]", "train.freeze=[router]"]
    by_arm = {f: [written[str(j)] for j in range(2 * i, 2 * i + 2)] for i, f in enumerate(FREEZE)}
    for freeze, values in by_arm.items():
        exact, changed = np.array(values).T
        cells = arms[f"train.freeze={freeze}"]
        assert cells["exact match"].startswith(f"{exact.mean():.4f} ± {exact.std(ddof=1):.4f}")
        assert cells["top-1 changed from start"].startswith(f"{changed.mean():.4f} ± {changed.std(ddof=1):.4f}")
    # the same seeds in both arms: the exact-match difference is paired seed by seed
    d = np.array(by_arm["[router]"])[:, 0] - np.array(by_arm["[]"])[:, 0]
    assert arms["train.freeze=[router]"]["Δ exact match vs reference"].startswith(f"{d.mean():+.4f} ± ")
    assert "(paired, 2 seeds)" in arms["train.freeze=[router]"]["Δ exact match vs reference"]

    rows = json.loads((sweep / "report.json").read_text())["rows"]
    assert [r["final_exact_match"] for r in rows] == [written[str(j)][0] for j in range(4)]


def test_runs_without_sft_numbers_get_no_sft_columns(base_config, tmp_path):
    sweep = tmp_path / "pretrain"
    for seed in SEEDS:
        fake_run(sweep / seed, base_config, [f"train.seed={seed}"], make_records(int(seed)))
    assert report_main([str(sweep)]) == 0
    tables = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]
    assert tables and not any("exact match" in line or "from start" in line for line in tables)
    assert all(r["final_exact_match"] is None
               for r in json.loads((sweep / "report.json").read_text())["rows"])
