"""Arms across seeds, differences against a reference arm with their noise, the loss-vs-imbalance
plot, one colour scale for every expert-load heat map, and resumed runs read with the settings
they finished with. Every run directory is written by hand (tests/experiments/run_fixtures.py);
the expected numbers come from numpy / scipy on the records, not from the report's code."""

import json
import math

import matplotlib.figure
import numpy as np
import pytest
from scipy import stats

from experiments.report import main as report_main
from experiments.report import write_report
from experiments.report_arms import (
    choose_reference,
    compare_arms,
    difference,
    group_arms,
    paired_difference,
    spread,
)
from experiments.report_runs import find_run_dirs, read_run, summarise
from tests.experiments.run_fixtures import add_launch, fake_run, make_records, with_keys

# arm -> (per-seed shift of the final validation loss, skew of the expert load)
SHIFTS = {"micro_batch": [0.013, -0.004, 0.021], "none": [-0.002, 0.006, -0.011],
          "global": [0.500, 0.520, 0.490]}
SEEDS = {"micro_batch": ["0", "1", "2"], "none": ["0", "1", "2"], "global": ["3", "4", "5"]}


def write_balancing_sweep(root, base_config):
    """3 arms x 3 seeds as the balancing preset lays them out (jobs numbered arm-major; `global`
    ran other seeds than the rest), plus one crashed job of the micro_batch arm; every run's config
    declares `balance=none` the reference."""
    config = {**base_config, "experiment_reference": "balance=none"}
    sweep, job, expected = root / "sweep", 0, {}
    for a, (arm, shifts) in enumerate(SHIFTS.items()):
        for seed, shift in zip(SEEDS[arm], shifts):
            records = make_records(100 * a + int(seed), n_experts=4 + 2 * a, layers=("1", "2"),
                                   val_shift=shift)
            fake_run(sweep / str(job), with_keys(config, train={"seed": int(seed)}),
                     ["experiment=balancing", f"balance={arm}", f"train.seed={seed}"], records)
            expected.setdefault(arm, []).append(records)
            job += 1
    fake_run(sweep / str(job), config, ["experiment=balancing", "balance=micro_batch",
                                        "train.seed=3"], make_records(7, steps=20), state="crashed")
    return sweep, expected


def tail_max_over_mean(records):
    """Load max/mean averaged over MoE layers and the last 25% of logged steps, from the loads."""
    tail = records[-math.ceil(len(records) * 0.25):]
    loads = np.array([[r["router"][layer]["load"] for layer in sorted(r["router"])] for r in tail])
    return float((loads.max(axis=2) / loads.mean(axis=2)).mean())  # loads: [steps, layers, E]


def test_arms_group_seeds_and_their_statistics_match_numpy(base_config, tmp_path):
    sweep, expected = write_balancing_sweep(tmp_path, base_config)
    runs = [read_run(d, sweep) for d in find_run_dirs(sweep)]
    rows = [summarise(r) for r in runs]
    arms = group_arms(runs, rows)
    assert [a.label for a in arms] == ["balance=micro_batch", "balance=none", "balance=global"]
    assert [a.runs for a in arms] == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]]
    assert arms[0].seeds == SEEDS["micro_batch"] and arms[0].excluded == ["9 (crashed)"]
    for arm, records_of in zip(arms, expected.values()):
        finals = np.array([[r for r in recs if "val_loss" in r][-1]["val_loss"] for recs in records_of])
        bests = np.array([min(r["val_loss"] for r in recs if "val_loss" in r) for recs in records_of])
        loads = np.array([tail_max_over_mean(recs) for recs in records_of])
        for measure, values in (("final_val_loss", finals), ("best_val_loss", bests),
                                ("load_max_over_mean", loads)):
            s = arm.stats[measure]
            assert (s.n, s.mean, s.std, s.lo, s.hi) == pytest.approx(
                (3, values.mean(), values.std(ddof=1), values.min(), values.max())), measure


def test_differences_are_paired_on_shared_seeds_else_welch_and_the_verdict_follows(base_config,
                                                                                 tmp_path):
    sweep, expected = write_balancing_sweep(tmp_path, base_config)
    runs = [read_run(d, sweep) for d in find_run_dirs(sweep)]
    arms = group_arms(runs, [summarise(r) for r in runs])
    reference, note = choose_reference(arms, runs, None)  # the preset's declared reference
    assert reference.label == "balance=none" and note is None
    compare_arms(arms, reference)
    finals = {arm: np.array([[r for r in recs if "val_loss" in r][-1]["val_loss"] for recs in rs])
              for arm, rs in expected.items()}
    micro, none, glob = arms
    assert none.verdict == "reference" and none.diffs == {}
    # micro_batch ran seeds 0, 1, 2 like the reference: paired t-test on the per-seed differences
    paired = stats.ttest_rel(finals["micro_batch"], finals["none"])
    d = finals["micro_batch"] - finals["none"]
    diff = micro.diffs["final_val_loss"]
    assert (diff.value, diff.paired) == (pytest.approx(d.mean()), 3)
    assert diff.noise == pytest.approx(2 * d.mean() / paired.statistic)  # t = mean / SE
    # micro_batch is 0.012 above none, per-seed differences spread by 0.021: within noise.
    assert diff.within_noise and micro.verdict.startswith("same loss within noise")
    # global ran seeds 3, 4, 5: nothing to pair, Welch's unpaired test
    welch = stats.ttest_ind(finals["global"], finals["none"], equal_var=False)
    d = finals["global"].mean() - finals["none"].mean()
    diff = glob.diffs["final_val_loss"]
    assert (diff.value, diff.paired) == (pytest.approx(d), 0)
    assert diff.noise == pytest.approx(2 * d / welch.statistic)
    assert glob.verdict.startswith("higher loss (+0.5")  # 0.5 above, spreads of 0.015
    load = glob.diffs["load_max_over_mean"]  # 8 experts against 4: a different max/mean
    assert load.value == pytest.approx(glob.stats["load_max_over_mean"].mean
                                       - reference.stats["load_max_over_mean"].mean)
    said = "same balance within noise" if load.within_noise else (
        f"{glob.stats['load_max_over_mean'].mean:.2f} vs {none.stats['load_max_over_mean'].mean:.2f}")
    assert said in glob.verdict


def test_single_runs_give_unknown_noise_and_hand_computed_differences():
    a, b = spread([6.8]), spread([6.7, 6.9])
    assert (a.n, a.mean, a.std) == (1, 6.8, None)
    assert b.std == pytest.approx(math.sqrt(0.02))  # ((0.1)^2 + (0.1)^2) / (2 - 1)
    d = difference(a, b)
    assert d.value == pytest.approx(0.0) and d.noise is None and d.within_noise is None
    # paired: d_i = (0.1, 0.3) -> mean 0.2, std 0.1414, noise 2 * 0.1414 / sqrt(2) = 0.2
    d = paired_difference({"0": 6.8, "1": 7.2, "9": 5.0}, {"0": 6.7, "1": 6.9, "3": 1.0})
    assert (d.value, d.noise, d.paired) == (pytest.approx(0.2), pytest.approx(0.2), 2)
    assert paired_difference({"0": 6.8, "1": 7.2}, {"0": 6.7}) is None  # one common seed
    c = spread([6.0, 6.2, 6.4])  # std 0.2
    d = difference(c, b)  # 2 sqrt(0.04 / 3 + 0.02 / 2)
    assert d.value == pytest.approx(-0.6) and d.noise == pytest.approx(2 * math.sqrt(0.04 / 3 + 0.01))
    assert d.within_noise is False
    assert spread([]).n == 0 and spread([float("nan"), 1.0]).n == 1


def test_reference_option_report_and_its_errors(base_config, tmp_path, capsys):
    sweep, _ = write_balancing_sweep(tmp_path, base_config)
    out = tmp_path / "out"
    assert report_main([str(sweep), "--out", str(out), "--reference", "balance=global"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "balance=global"
    by_label = {a["label"]: a for a in report["arms"]}
    assert by_label["balance=global"]["verdict"] == "reference"
    assert by_label["balance=none"]["verdict"].startswith("lower loss (-0.5")
    text = (out / "report.md").read_text()
    assert "## Arms" in text and "| **balance=global** | 3 (3, 4, 5) |" in text
    assert "3 (0, 1, 2), not counted: 9 (crashed)" in text
    noise = np.sqrt(np.mean([np.var(s, ddof=1) for s in SHIFTS.values()]))  # equal n: pooled var
    assert f"pooled over arms): {noise:.4f} (6 degrees of freedom)" in text
    assert "| arm | runs (seeds) |" in printed
    assert (out / "loss_vs_imbalance.png").stat().st_size > 10_000
    for bad, said in (("balance=nope", "matches no arm"), ("experiment=balancing", "matches 3 arms"),
                      ("none", "give the reference arm as key=value")):
        with pytest.raises(SystemExit, match=said):
            report_main([str(sweep), "--out", str(tmp_path / "bad"), "--reference", bad])
    assert not (tmp_path / "bad").exists()  # refused before writing anything


def test_a_declared_reference_that_was_not_swept_falls_back_to_the_first_arm(base_config, tmp_path):
    sweep = tmp_path / "sweep"
    config = {**base_config, "experiment_reference": "balance=none"}
    for job, arm in enumerate(("global", "aux_free")):
        fake_run(sweep / str(job), config, [f"balance={arm}"], make_records(job))
    _, arms_table, _, _, notes = write_report([sweep], sweep)
    assert any("`balance=none` is not among the arms swept" in n for n in notes)
    assert "| **balance=global** |" in arms_table
    assert "one run: noise unknown, run more seeds" in arms_table
    # a single run: nothing to compare, no arms section and no note about the reference
    _, arms_table, _, _, notes = write_report([sweep / "0"], tmp_path / "one")
    assert arms_table == "" and not any("reference" in n for n in notes)
    assert "## Arms" not in (tmp_path / "one" / "report.md").read_text()


def test_loss_vs_imbalance_plot_has_every_run_and_the_arm_means(base_config, tmp_path, monkeypatch):
    import experiments.report_plots as plots

    sweep, expected = write_balancing_sweep(tmp_path, base_config)
    runs = [read_run(d, sweep) for d in find_run_dirs(sweep)]
    rows = [summarise(r) for r in runs]
    arms = group_arms(runs, rows)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_loss_vs_imbalance(arms, rows, tmp_path / "scatter.png")
    (ax,) = figures[0].axes
    dots = [c for c in ax.collections if c.get_offsets().shape[0] == 3]  # one scatter per arm
    assert len(dots) == 3
    for arm_dots, records_of in zip(dots, expected.values()):
        points = [(tail_max_over_mean(recs), [r for r in recs if "val_loss" in r][-1]["val_loss"])
                  for recs in records_of]
        assert np.asarray(arm_dots.get_offsets()) == pytest.approx(np.array(points))
        mean = np.mean(points, axis=0)
        assert any(np.allclose(line.get_xydata(), [mean]) for line in ax.lines)  # the arm's mean
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "balance=micro_batch (n=3)", "balance=none (n=3)", "balance=global (n=3)"]


def test_every_expert_load_heat_map_uses_one_colour_scale(base_config, tmp_path, monkeypatch):
    """The trainer's per-run expert_load.png (h64lm.model.moe.plot_load_heatmap) and the report's
    two heat maps: equal norms and colour maps, so one colour is one load / mean everywhere, for a
    balanced run and for a very skewed one."""
    import experiments.report_plots as plots
    from h64lm.model.moe import plot_load_heatmap

    images = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: images.extend(im for ax in fig.axes for im in ax.images))
    for i, concentration in enumerate((50.0, 0.2)):  # near-even loads, then one expert taking most
        records = make_records(i, n_experts=8, layers=("1", "3"))
        rng = np.random.default_rng(i)
        for r in records:
            for layer in ("1", "3"):
                r["router"][layer]["load"] = rng.dirichlet([concentration] * 8).tolist()
        run = read_run(fake_run(tmp_path / str(i), base_config, [], records), tmp_path)
        plot_load_heatmap(records, tmp_path / f"run{i}.png")
        plots.plot_expert_balance([run], ["run"], tmp_path / f"balance{i}.png")
        plots.plot_expert_load_steps(run, "run", tmp_path / f"steps{i}.png")
    assert len(images) == 2 * (1 + 1 + 2)  # per run: one, one, one per layer
    first = images[0]
    for im in images:
        assert type(im.norm) is type(first.norm)
        assert (im.norm.vmin, im.norm.vmax) == (first.norm.vmin, first.norm.vmax) == (1 / 8, 8)
        assert im.cmap.name == first.cmap.name
        colours = im.cmap(im.norm(np.array([0.0625, 0.5, 1.0, 2.0, 3.0, 8.0])))
        assert colours == pytest.approx(first.cmap(first.norm(np.array([0.0625, 0.5, 1.0, 2.0, 3.0, 8.0]))))


def test_a_resumed_run_shows_the_settings_it_finished_with(base_config, tmp_path, capsys):
    """Run 0 trained to 20 steps, then was resumed with train.max_steps=40 train.resume=auto
    (and later evaluated into its own folder); run 1 was launched for 40 steps at once with
    another seed. The report gives run 0 the second launch's settings and puts both in one arm."""
    sweep = tmp_path / "sweep"
    first = with_keys(base_config, train={"max_steps": 20, "seed": 0})
    last = with_keys(base_config, train={"max_steps": 40, "seed": 0, "resume": "auto"})
    run0 = fake_run(sweep / "0", first, ["train.max_steps=20", "train.seed=0"], make_records(0))
    add_launch(run0, "2026-01-01_10-00-00-000001", first, ["train.max_steps=20", "train.seed=0"])
    add_launch(run0, "2026-01-01_11-00-00-000001", last,
               ["train.max_steps=40", "train.seed=0", "train.resume=auto"])
    add_launch(run0, "2026-01-01_12-00-00-000001", {**last, "mode": "eval"}, ["mode=eval"])
    other = with_keys(base_config, train={"max_steps": 40, "seed": 1})
    run1 = fake_run(sweep / "1", other, ["train.max_steps=40", "train.seed=1"], make_records(1))
    add_launch(run1, "2026-01-01_10-00-00-000002", other, ["train.max_steps=40", "train.seed=1"])

    run = read_run(run0, sweep)
    assert run.launches == 2 and run.overrides["train.max_steps"] == "40"
    assert run.config["train"]["max_steps"] == 40 and run.first_overrides["train.max_steps"] == "20"
    assert report_main([str(sweep)]) == 0
    report = json.loads((sweep / "report.json").read_text())
    assert [r["max_steps"] for r in report["rows"]] == [40, 40]
    (arm,) = report["arms"]
    assert arm["runs"] == ["0", "1"] and arm["seeds"] == ["0", "1"]
    note = next(line for line in capsys.readouterr().out.splitlines() if "resumed" in line)
    assert "0 (2 launches; train.max_steps: 20 -> 40, train.resume: — -> auto)" in note
    text = (sweep / "report.md").read_text()
    assert "Common overrides: `train.max_steps=40`" in text  # not the first launch's 20
    header, _, row0, _ = text.split("## Runs")[1].strip().splitlines()[:4]
    cells = {h.strip(): c.strip() for h, c in zip(header.split("|"), row0.split("|"))}
    assert (cells["train.seed"], cells["train.resume"], cells["steps"]) == ("0", "auto", "40")


def test_balancing_preset_runs_every_arm_with_three_seeds_and_its_reference_is_an_arm(tmp_path):
    from tests.experiments.test_presets import sweep_jobs
    from tests.helpers import compose_cfg

    jobs = sweep_jobs(["experiment=balancing"])
    arms: dict[str, set[str]] = {}
    for job in jobs:
        o = dict(item.split("=", 1) for item in job)
        arms.setdefault(o["balance"], set()).add(o["train.seed"])
    assert len(arms) == 5 and all(seeds == {"0", "1", "2"} for seeds in arms.values())
    reference = compose_cfg(["experiment=balancing"]).experiment_reference
    assert reference == "balance=none" and reference.split("=")[1] in arms
