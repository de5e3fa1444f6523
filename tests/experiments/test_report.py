"""A real 2-job multirun (a few steps each) and the comparison report built from it."""

import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
import yaml

from experiments.report import main as report_main
from experiments.report import markdown_table, write_report
from experiments.report_runs import find_run_dirs, read_run, run_state, summarise
from experiments.report_wandb import build_wandb_report
from h64lm.train.metrics import read_metrics
from tests.experiments.run_fixtures import fake_run, make_records, with_keys
from tests.helpers import FAST, ROOT, run_cli, text_corpus, wandb_offline_records

LRS = ["0.001", "0.003"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python run.py -m experiment=lr optim.lr=1e-3,3e-3` on the FAST model, W&B offline."""
    tmp = tmp_path_factory.mktemp("sweep")
    corpus = text_corpus(tmp)
    sweep_dir = tmp / "lr_sweep"
    args = ["-m", "experiment=lr", f"optim.lr={','.join(LRS)}",
            *(o for o in FAST if not o.startswith(("logger", "optim.lr"))), "logger=wandb", "logger.mode=offline",
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

    runs_section = (out / "report.md").read_text().split("## Runs")[1]
    table = [line for line in runs_section.splitlines()
             if line.startswith("| ") and not line.startswith("| run")]
    assert len(table) == 2
    for line, lr, row in zip(table, LRS, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [row["run"], lr, "finished"]
        assert f"{row['best_val_loss']:.4f}" in cells and f"{row['final_val_ppl']:.2f}" in cells
        assert cells[-2] == f"{row['final_val_loss_len64']:.4f}"  # the "val_loss @64" column
    for name in ("loss.png", "val_loss_vs_flops.png", "val_loss_vs_time.png", "expert_load.png",
                 "expert_load_steps/0.png", "expert_load_steps/1.png"):
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

    _, _, table, _, _ = write_report([copy], copy)
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


# ---------------------------------------------------------------- hand-built run directories
# These runs are written directly (no training), so every number in them is known in advance
# (tests/experiments/run_fixtures.py).


def test_smoothed_loss_flops_and_time_series_match_the_records(base_config, tmp_path):
    from h64lm.model import H64LMConfig, flops_per_token

    sweep = tmp_path / "sweep"
    dense = with_keys(base_config, model={"moe_layers": "none"})
    runs = {"0": (base_config, make_records(0)),
            "1": (dense, make_records(1, log_every=2, layers=()))}
    for name, (config, records) in runs.items():
        fake_run(sweep / name, config, [f"arm={name}"], records)
    report_main([str(sweep)])
    report = json.loads((sweep / "report.json").read_text())
    beta = 0.9
    for row, (name, (config, records)) in zip(report["rows"], runs.items()):
        curve = report["curves"][name]
        loss = np.array([r["loss"] for r in records])
        # EMA as the explicit weighted sum sum_i beta^(t-i) (1-beta) x_i / (1 - beta^t)
        expected_ema = [sum(beta ** (t - i) * (1 - beta) * loss[i] for i in range(t + 1))
                        / (1 - beta ** (t + 1)) for t in range(len(loss))]
        assert curve["train_loss_ema"] == pytest.approx(expected_ema)
        assert curve["train_tokens"] == [r["tokens"] for r in records]
        evals = [r for r in records if "val_loss" in r]
        assert curve["val_loss"] == [r["val_loss"] for r in evals]
        per_token = flops_per_token(H64LMConfig(**config["model"]), config["data"]["seq_len"])
        assert curve["val_flops"] == pytest.approx([per_token * r["tokens"] for r in evals])
        assert row["train_flops"] == pytest.approx(per_token * records[-1]["tokens"])
        # seconds: every step of the run, unlogged steps taking as long as the next logged one
        step_times = np.repeat([r["step_time_s"] for r in records], records[0]["step"])
        seconds = np.cumsum(step_times)
        assert curve["val_seconds"] == pytest.approx([seconds[r["step"] - 1] for r in evals])
        assert row["train_seconds"] == pytest.approx(seconds[-1])
    header = (sweep / "report.md").read_text().split("| run |")[1].splitlines()[0]
    assert "PFLOP" in header and "train s" in header
    assert "router entropy" not in header and " acc" not in header  # nobody logged them
    for name in ("loss.png", "val_loss_vs_flops.png", "val_loss_vs_time.png", "expert_load.png",
                 "expert_load_steps/0.png"):
        assert (sweep / name).stat().st_size > 10_000, name
        assert f"({name})" in (sweep / "report.md").read_text()
    assert not (sweep / "expert_load_steps" / "1.png").exists()  # dense: no router


def test_expert_load_heat_map_shows_load_over_mean_on_a_scale_centred_at_1(
        base_config, tmp_path, monkeypatch):
    import experiments.report_plots as plots

    records = make_records(2, layers=("1", "3"), n_experts=8)
    records[5]["router"]["3"]["load"] = [0.0] + records[5]["router"]["3"]["load"][1:]
    run = read_run(fake_run(tmp_path / "0", base_config, [], records), tmp_path)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_expert_load_steps(run, "run 0", tmp_path / "steps.png")
    axes = [ax for ax in figures[0].axes if ax.images]
    assert len(axes) == 2
    for ax, layer in zip(axes, ("1", "3")):
        load = np.array([r["router"][layer]["load"] for r in records])  # [steps, E]
        ratio = load / load.mean(axis=1, keepdims=True)
        image = ax.images[0]
        norm = image.norm
        assert norm.vmin * norm.vmax == pytest.approx(1.0)  # log scale centred at 1
        assert norm.vmax == 8.0  # fixed limits, whatever this run's largest ratio
        shown = np.asarray(image.get_array())  # [E, steps], zero loads floored at vmin
        assert shown == pytest.approx(np.clip(ratio.T, norm.vmin, norm.vmax))
    assert any("load / mean" in ax.get_ylabel() for ax in figures[0].axes)  # colour bars

    figures.clear()
    plots.plot_expert_balance([run], ["run 0"], tmp_path / "balance.png")
    (ax,) = [ax for ax in figures[0].axes if ax.images]
    tail = records[-10:]  # the last 25% of 40 logged steps
    floor = ax.images[0].norm.vmin
    for row, layer in zip(np.asarray(ax.images[0].get_array()), ("1", "3")):
        load = np.array([r["router"][layer]["load"] for r in tail])
        expected = (load / load.mean(axis=1, keepdims=True)).mean(axis=0)
        assert row == pytest.approx(np.maximum(expected, floor))


def test_eval_and_generate_folders_are_skipped_not_failed(base_config, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", base_config, ["optim.lr=1e-3"], make_records(0, layers=()))
    fake_run(sweep / "0" / "evals" / "2026-01-01_10-00-00", {**base_config, "mode": "eval"},
             ["mode=eval"], files=["eval.json"])
    fake_run(sweep / "0" / "generations" / "2026-01-01_10-05-00",
             {**base_config, "mode": "generate"}, ["mode=generate"], files=["generations.txt"])
    fake_run(sweep / "1", {**base_config, "mode": "eval"}, ["mode=eval"], files=["eval.json"])
    no_mode = {k: v for k, v in base_config.items() if k != "mode"}
    fake_run(sweep / "2", no_mode, ["prompt=Hi"], files=["generations.txt"])
    fake_run(sweep / "3", base_config, ["optim.lr=3e-3"])  # a training job that failed at once
    # A training run that a later `mode=eval` reused (its .hydra/config.yaml now says eval).
    fake_run(sweep / "4", {**base_config, "mode": "eval"}, ["optim.lr=1e-2"],
             make_records(4, layers=()), files=["eval.json"])
    assert report_main([str(sweep)]) == 0
    said = capsys.readouterr().out
    rows = json.loads((sweep / "report.json").read_text())["rows"]
    assert [(r["run"], r["state"]) for r in rows] == [
        ("0", "finished"), ("3", "failed"), ("4", "finished")]
    assert "3 runs, 1 not finished: 3 failed." in (sweep / "report.md").read_text()
    note = next(line for line in said.splitlines() if line.startswith("note: skipped 4 "))
    assert "0/evals/2026-01-01_10-00-00" in note and "2" in note.split(":", 1)[1]
    assert note in (sweep / "report.md").read_text()


def test_shortened_sweeps_warn_naming_runs_and_keys(base_config, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    settings = {"0": (10, 50, 2), "1": (10, 5, 10), "2": (40, 10, 2)}  # max_steps, eval_every, warmup
    for name, (steps, every, warmup) in settings.items():
        config = with_keys(base_config, train={"max_steps": steps, "eval_every": every},
                           optim={"warmup_steps": warmup})
        fake_run(sweep / name, config, [f"train.max_steps={steps}"],
                 make_records(int(name), steps=steps, eval_every=min(every, steps), layers=()))
    assert report_main([str(sweep)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2
    eval_warning, warmup_warning = warnings
    assert "train.max_steps < train.eval_every" in eval_warning and "0 (10 < 50)" in eval_warning
    assert "1 (" not in eval_warning and "2 (" not in eval_warning
    assert "optim.warmup_steps >= train.max_steps" in warmup_warning
    assert "1 (10 >= 10)" in warmup_warning and "0 (" not in warmup_warning
    assert all(w in (sweep / "report.md").read_text() for w in warnings)


def test_routing_stats_and_downstream_accuracy_columns(base_config, tmp_path):
    sweep = tmp_path / "sweep"
    logged = {}
    for name in ("0", "1"):
        records = make_records(int(name), steps=8, eval_every=4, layers=("1", "3"))
        rng = np.random.default_rng(10 + int(name))
        for r in records:
            r["router.1.entropy"], r["router.3.entropy"] = rng.uniform(0.5, 1.4, 2).tolist()
            for layer in ("1", "3"):
                r["router"][layer]["top1_changed"] = float(rng.uniform(0, 0.2))
        records[3]["downstream/hellaswag/acc"] = 0.25 + int(name) / 10
        records[7]["downstream/hellaswag/acc"] = 0.30 + int(name) / 10
        records[7]["downstream/arc_easy/acc"] = 0.4
        logged[name] = records
        fake_run(sweep / name, base_config, [f"train.seed={name}"], records)
    runs = [read_run(d, sweep) for d in find_run_dirs(sweep)]
    table = markdown_table(runs, [summarise(r) for r in runs], ["train.seed"])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    for name, line in zip(("0", "1"), table.splitlines()[2:]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        tail = logged[name][-2:]  # 25% of 8 logged steps
        entropy = np.mean([r[f"router.{layer}.entropy"] for r in tail for layer in ("1", "3")])
        changed = np.mean([r["router"][layer]["top1_changed"] for r in tail for layer in ("1", "3")])
        assert cells["router entropy"] == f"{entropy:.3f}"
        assert cells["top-1 changed"] == f"{changed:.3f}"
        assert cells["hellaswag acc"] == f"{0.30 + int(name) / 10:.3f}"  # the last logged value
        assert cells["arc_easy acc"] == "0.400"


def test_routing_snapshot_joins_the_router_stats_without_replacing_the_training_load():
    from experiments.report_series import router_layers

    record = {"router": {"1": {"load": [0.5, 0.5], "load_max_over_mean": 1.0}},
              "routing": {"1": {"load": [0.9, 0.1], "load_max_over_mean": 1.8, "router_entropy": 0.4,
                                "top1_changed": 0.25}}}
    layer = router_layers(record)["1"]
    assert layer["load"] == [0.5, 0.5] and layer["load_max_over_mean"] == 1.0
    assert layer["entropy"] == 0.4 and layer["top1_changed"] == 0.25
