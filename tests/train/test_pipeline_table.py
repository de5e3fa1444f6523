"""RUN/pipeline.md and pipeline.json: every number of a row comes from the stage's own files."""

import json

import pytest

from h64lm.train.pipeline_table import format_table, routing_shift, stage_row, write_table


def _write_stage(stage_dir, records, status, evaluation=None):
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    (stage_dir / "status.json").write_text(json.dumps(status))
    if evaluation is not None:
        (stage_dir / "evals" / "pipeline").mkdir(parents=True)
        (stage_dir / "evals" / "pipeline" / "eval.json").write_text(json.dumps(evaluation))


def test_a_row_reads_the_last_validation_rewards_routing_and_the_evaluation(tmp_path):
    records = [
        {"step": 1, "loss": 2.0, "rewards/margins": 0.1, "rewards/accuracies": 0.5},
        {"step": 2, "loss": 1.9, "val_loss": 1.5, "routing": {"1": {"top1_changed_from_start": 0.25},
                                                              "3": {"top1_changed_from_start": 0.75}}},
        {"step": 3, "loss": 1.8, "rewards/margins": 0.4, "reward/mean": 0.2},
        {"step": 4, "loss": 1.7, "val_loss": 1.25, "routing": {"1": {"top1_changed_from_start": 0.5},
                                                               "3": {"top1_changed_from_start": 0.0,
                                                                     "load": [0.5, 0.5]}}},
    ]
    evaluation = {"data": "arithmetic", "val_loss": 0.75, "sft/exact_match": 0.375, "exact_match_examples": 8}
    _write_stage(tmp_path / "stages" / "2_dpo", records, {"state": "finished", "step": 4}, evaluation)
    row = stage_row(2, "dpo", tmp_path / "stages" / "2_dpo", 61.4, tmp_path / "stages" / "2_dpo" / "evals" / "pipeline")
    assert row["val_loss"] == 1.25  # the last evaluation's
    assert row["routing_shift"] == pytest.approx((0.5 + 0.0) / 2)  # its layers' mean
    assert row["rewards"] == {"rewards/margins": 0.4, "rewards/accuracies": 0.5, "reward/mean": 0.2}
    assert (row["exact_match"], row["eval_val_loss"], row["exact_match_examples"]) == (0.375, 0.75, 8)
    assert (row["state"], row["steps"], row["wall_s"], row["dir"]) == ("finished", 4, 61.4, "stages/2_dpo")

    write_table(tmp_path, [row])
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"] == [row]
    line = (tmp_path / "pipeline.md").read_text().splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["2 dpo", "4", "0.375", "–", "0.7500", "1.2500",
                     "reward/mean 0.200, rewards/accuracies 0.500, rewards/margins 0.400", "0.250", "1:01"]


def test_a_stage_without_evaluation_routing_or_rewards_shows_dashes_and_its_state(tmp_path):
    _write_stage(tmp_path / "0_pretrain", [{"step": 1, "loss": 9.0, "val_loss": 8.5}], {"state": "stopped", "step": 1})
    row = stage_row(0, "pretrain", tmp_path / "0_pretrain", None, tmp_path / "0_pretrain" / "evals" / "pipeline")
    assert (row["exact_match"], row["routing_shift"], row["rewards"], row["val_loss"]) == (None, None, {}, 8.5)
    cells = [c.strip() for c in format_table([row]).splitlines()[2].strip("|").split("|")]
    assert cells == ["0 pretrain (stopped)", "1", "–", "–", "–", "8.5000", "–", "–", "–"]


def test_vs_previous_is_the_paired_difference_on_the_same_problems(tmp_path):
    # 10 problems: sft solves 0-4, dpo solves 2-8: dpo gains 5, 6, 7, 8 and loses 0, 1
    solved = {"sft": [int(i < 5) for i in range(10)], "dpo": [int(2 <= i <= 8) for i in range(10)]}
    rows = []
    for k, name in enumerate(solved):
        evaluation = {"data": "arithmetic", "val_loss": 0.5, "sft/exact_match": sum(solved[name]) / 10,
                      "exact_match_examples": 10, "exact_match_solved": solved[name]}
        _write_stage(tmp_path / f"{k}_{name}", [{"step": 1, "loss": 1.0}], {"state": "finished", "step": 1}, evaluation)
        rows.append(stage_row(k, name, tmp_path / f"{k}_{name}", 1.0, tmp_path / f"{k}_{name}" / "evals" / "pipeline"))
    # per-problem differences: -1 -1 0 0 0 +1 +1 +1 +1 0 -> mean 0.2,
    # squared deviations 2 x 1.44 + 4 x 0.04 + 4 x 0.64 = 5.6
    two_se = 2 * (5.6 / 9) ** 0.5 / 10 ** 0.5
    lines = format_table(rows).splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")][3] == "–"  # nothing before the first stage
    assert [c.strip() for c in lines[3].strip("|").split("|")][3] == f"+0.200 ± {two_se:.3f}"
    # outcomes of another length (eval_overrides changed between stages) or damaged: no difference
    for damaged in (solved["sft"][:5], [None] * 10, ["1"] * 10, "1111100000"):
        rows[0]["exact_match_solved"] = damaged
        assert [c.strip() for c in format_table(rows).splitlines()[3].strip("|").split("|")][3] == "–"


def test_routing_shift_reads_wandb_style_flat_keys_too():
    assert routing_shift({"routing.0.top1_changed_from_start": 0.2, "routing/2/top1_changed_from_start": 0.6,
                          "routing.0.top1_changed": 0.9}) == pytest.approx(0.4)
    assert routing_shift({"routing": {"1": {"top1_changed": 0.3}}}) is None
