"""A real 2-job multirun (a few steps each) and the comparison report built from it."""

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml

from experiments.report import main as report_main
from experiments.report import write_report
from experiments.report_runs import find_run_dirs, read_run, run_state
from experiments.report_wandb import build_wandb_report
from h64lm.train.metrics import read_metrics
from tests.helpers import FAST, ROOT, run_cli, text_corpus, wandb_offline_records

LRS = ["0.001", "0.003"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python run.py -m experiment=lr optim.lr=1e-3,3e-3` on the FAST model, W&B offline."""
    tmp = tmp_path_factory.mktemp("sweep")
    corpus = text_corpus(tmp)
    sweep_dir = tmp / "lr_sweep"
    args = ["-m", "experiment=lr", f"optim.lr={','.join(LRS)}",
            *(o for o in FAST if not o.startswith("logger")), "logger=wandb", "logger.mode=offline",
            "data=text", f"data.path={corpus}", "train.extra_eval_seq_lens=[64]",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = run_cli(args, cwd=tmp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_each_job_has_its_run_directory_overrides_and_wandb_run(sweep):
    runs = find_run_dirs(sweep)
    assert [r.name for r in runs] == ["0", "1"]
    for run_dir, lr in zip(runs, LRS):
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"optim.lr={lr}" in overrides and "experiment=lr" in overrides
        assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 6
        records = wandb_offline_records(run_dir)
        wb = next(r["run"] for r in records if r["type"] == "run")
        assert wb["run_group"] == "lr" and wb["job_type"] == "train"
        assert f"optim.lr={lr}" in wb["tags"]
        assert wb["run_id"] == read_run(run_dir, sweep).wandb_id
    ids = {read_run(d, sweep).wandb_id for d in runs}
    assert len(ids) == 2, "both jobs logged into one W&B run"


def _expected_row(run_dir):
    """The table's numbers, recomputed from metrics.jsonl alone."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    return {
        "best_val_loss": best["val_loss"], "best_val_ppl": best["val_ppl"],
        "final_val_loss_len64": evals[-1]["val_loss_len64"],
        "final_val_loss": evals[-1]["val_loss"], "final_val_ppl": evals[-1]["val_ppl"],
        "tokens": records[-1]["tokens"], "step": records[-1]["step"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
    }


def test_report_rows_match_the_metrics_files_and_plots_exist(sweep, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["varying"] == ["optim.lr"]
    rows = report["rows"]
    assert [r["run"] for r in rows] == ["0", "1"]
    for row, run_dir in zip(rows, find_run_dirs(sweep)):
        expected = _expected_row(run_dir)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
        assert row["state"] == "finished"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (row["parameters"], row["active_parameters"]) == (
            summary["parameters"], summary["active_parameters"])
        balance = row["load_max_over_mean"]
        assert balance >= 1.0 and balance <= 4.0  # 4 experts: between even and all-on-one

    table = [line for line in (out / "report.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| run")]
    assert len(table) == 2
    for line, lr, row in zip(table, LRS, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [row["run"], lr, "finished"]
        assert f"{row['best_val_loss']:.4f}" in cells and f"{row['final_val_ppl']:.2f}" in cells
        assert cells[-2] == f"{row['final_val_loss_len64']:.4f}"  # the "val_loss @64" column
    for name in ("val_loss.png", "expert_load.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_crashed_failed_and_running_runs_are_listed_not_dropped(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    status = json.loads((copy / "0" / "status.json").read_text())
    # Job 0 killed by SIGKILL mid-run: status still "running", its process gone.
    (copy / "0" / "status.json").write_text(json.dumps({**status, "state": "running",
                                                        "pid": int(dead.stdout)}))
    (copy / "0" / "summary.json").unlink()
    # Job 1 still training (this test process stands in for it).
    (copy / "1" / "status.json").write_text(json.dumps({**status, "state": "running",
                                                        "pid": os.getpid()}))
    # Job 2 failed before training: Hydra wrote its config, nothing else.
    shutil.copytree(copy / "1" / ".hydra", copy / "2" / ".hydra")
    assert [run_state(copy / j) for j in ("0", "1", "2")] == ["crashed", "running", "failed"]

    _, table, _ = write_report([copy], copy)
    lines = table.splitlines()[2:]
    assert len(lines) == 3
    assert "crashed" in lines[0] and "running" in lines[1] and "failed" in lines[2]
    assert "6/6" in lines[0]  # steps done / planned for an unfinished run
    rows = json.loads((copy / "report.json").read_text())["rows"]
    assert rows[0]["best_val_loss"] == pytest.approx(_expected_row(sweep / "0")["best_val_loss"])
    assert rows[0]["parameters"] > 0  # counted from the config: no summary.json
    assert "3 runs, 3 not finished" in (copy / "report.md").read_text()


def test_wandb_report_groups_by_what_varies(sweep, tmp_path, capsys, monkeypatch):
    runs = [read_run(d, sweep) for d in find_run_dirs(sweep)]
    report = build_wandb_report(runs, "| table |", entity="someone", project="h64lm",
                                title="Sweep: lr")  # built, never saved
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    (runset,) = grid.runsets
    assert runset.groupby == ["config.optim.lr.value"]  # the varying override, not the seed
    assert all(r.wandb_id in runset.filters for r in runs)
    plotted = {y for panel in grid.panels for y in panel.y}
    assert {"val_loss", "val_ppl", "tokens_per_s", "router.1.load_max_over_mean"} <= plotted

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report_main([str(sweep), "--out", str(tmp_path), "--wandb"]) == 0
    said = capsys.readouterr().out
    assert "needs a reachable W&B server" in said
    assert (tmp_path / "report.md").exists()


def test_report_script_runs_from_the_command_line(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"), str(sweep),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "| run | optim.lr |" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "report.py"),
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 2 and "not a directory" in bad.stderr
