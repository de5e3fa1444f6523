"""The Hugging Face round trip under faults (experiments/hf_faults.py, counted by
experiments/faults.py): export of the reference run imported back bit for bit, damaged folders
and refused export targets in one line."""

from __future__ import annotations

from experiments.hf_faults import hf_trials


def test_hf_round_trip_damaged_folders_and_export_targets(tmp_path, base_args, reference):
    outcomes = hf_trials(tmp_path / "hf_faults", base_args, reference)
    assert len(outcomes) == 9
    failed = [o.note for o in outcomes if not o.ok or o.lost]
    assert not failed, failed
