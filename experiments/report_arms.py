"""Arms of a sweep, and the answer to "which arm is better, by how much, and is that more than
seed noise?"

An arm is the set of runs whose overrides (of their last launch) are equal once the seed and the
overrides that do not change what is trained are left out: runs that differ only in `train.seed`
are repeats of one arm. Per arm: the mean, sample standard deviation (n - 1) and range over its
finished runs of the final and best validation loss and of the expert imbalance (load max/mean,
mean over MoE layers and the last BALANCE_TAIL of logged steps).

Each arm is compared with a reference arm: d = mean(arm) - mean(reference) and its noise, twice
the standard error of d; "within noise" when |d| is not larger. Twice the standard error is a
rule of thumb, not a test: about a 95% interval for many seeds, but with 3 seeds (t with 2
degrees of freedom) a true zero difference exceeds it about 1 time in 5. When the two arms ran
the same seeds (at least two), the seed fixes the data order of both (and the initial weights
where their shapes agree), so the comparison is paired: d is the mean of the per-seed differences
d_i and its standard error std(d_i) / sqrt(n), which removes the seed's own effect (often larger
than the arms' difference). Otherwise Welch's unpaired sqrt(s_a^2 / n_a + s_r^2 / n_r). With one
run in either arm the noise is unknown and the verdict says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from experiments.report_runs import RunInfo, varying_keys

__all__ = [
    "Arm",
    "Diff",
    "NOT_ARM_KEYS",
    "SEED_KEY",
    "Spread",
    "arms_markdown",
    "choose_reference",
    "compare_arms",
    "difference",
    "group_arms",
    "paired_difference",
    "pooled_std",
    "spread",
]

SEED_KEY = "train.seed"
# Overrides that choose where a run starts or where its numbers go, not what it trains: a resume
# launched with `train.resume=auto` stays in its arm. Keys equal to one of these or starting with
# one ending in "." are left out of an arm's identity.
NOT_ARM_KEYS = (SEED_KEY, "train.resume", "logger.")

# (row key, header) of the per-arm statistics; the first is the loss the verdict compares, the
# last the imbalance (lower = more even).
MEASURES = [("final_val_loss", "final val loss"), ("best_val_loss", "best val loss"),
            ("final_exact_match", "exact match"),  # stage=sft: shown when some run logged them
            ("final_top1_changed_from_start", "top-1 changed from start"),
            ("load_max_over_mean", "load max/mean")]
LOSS, EXACT_MATCH, IMBALANCE = MEASURES[0][0], MEASURES[2][0], MEASURES[-1][0]


@dataclass
class Spread:
    n: int
    mean: float | None = None
    std: float | None = None  # sample standard deviation (n - 1); None below 2 values
    lo: float | None = None
    hi: float | None = None


@dataclass
class Diff:
    value: float  # mean(arm) - mean(reference), or the mean per-seed difference when paired
    noise: float | None  # 2 x the standard error of `value`; None: a single run somewhere
    paired: int = 0  # seeds paired (0: unpaired, Welch)

    @property
    def within_noise(self) -> bool | None:
        return None if self.noise is None else abs(self.value) <= self.noise


@dataclass
class Arm:
    overrides: dict[str, str]  # its identity: the overrides every run of the arm shares
    label: str  # the identity overrides that differ between arms ("balance=none")
    runs: list[str] = field(default_factory=list)  # finished runs (table names)
    seeds: list[str] = field(default_factory=list)  # parallel to runs
    excluded: list[str] = field(default_factory=list)  # "name (state)" of unfinished runs
    stats: dict[str, Spread] = field(default_factory=dict)  # measure -> spread over `runs`
    by_seed: dict[str, dict[str, float]] = field(default_factory=dict)  # measure -> seed -> value
    diffs: dict[str, Diff] = field(default_factory=dict)  # measure -> against the reference
    verdict: str = ""


def spread(values: list[float]) -> Spread:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return Spread(0)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Spread(len(values), statistics.fmean(values), std, min(values), max(values))


def difference(arm: Spread, reference: Spread) -> Diff | None:
    """Unpaired: mean(arm) - mean(reference) with twice Welch's standard error as its noise."""
    if not arm.n or not reference.n:
        return None
    noise = None
    if arm.std is not None and reference.std is not None:
        noise = 2 * math.sqrt(arm.std**2 / arm.n + reference.std**2 / reference.n)
    return Diff(arm.mean - reference.mean, noise)


def paired_difference(arm: dict[str, float], reference: dict[str, float]) -> Diff | None:
    """The mean of the per-seed differences arm[s] - reference[s] over the seeds both ran, with
    twice its standard error std(d) / sqrt(n); None below two common seeds."""
    common = [s for s in arm if s in reference]
    if len(common) < 2:
        return None
    d = [arm[s] - reference[s] for s in common]
    return Diff(statistics.fmean(d), 2 * statistics.stdev(d) / math.sqrt(len(d)), len(d))


def pooled_std(arms: list[Arm], measure: str = LOSS) -> tuple[float | None, int]:
    """(the seed-to-seed standard deviation pooled over arms, its degrees of freedom
    sum(n - 1)): the noise of one run, from every arm with repeats."""
    groups = [a.stats[measure] for a in arms if a.stats[measure].std is not None]
    dof = sum(g.n - 1 for g in groups)
    if not dof:
        return None, 0
    return math.sqrt(sum((g.n - 1) * g.std**2 for g in groups) / dof), dof


def _is_arm_key(key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NOT_ARM_KEYS)


def group_arms(runs: list[RunInfo], rows: list[dict[str, Any]]) -> list[Arm]:
    """Runs (with their summary rows, `row["run"]` the table name) grouped into arms, in the
    order each arm first appears; statistics over each arm's finished runs."""
    arms: dict[tuple, Arm] = {}
    members: dict[tuple, list[dict[str, Any]]] = {}
    for run, row in zip(runs, rows):
        identity = {k: v for k, v in run.overrides.items() if _is_arm_key(k)}
        key = tuple(sorted(identity.items()))
        arm = arms.setdefault(key, Arm(identity, ""))
        if row["state"] != "finished":
            arm.excluded.append(f"{row['run']} ({row['state']})")
            continue
        arm.runs.append(row["run"])
        arm.seeds.append(run.overrides.get(SEED_KEY)
                         or str(run.config.get("train", {}).get("seed", "?")))
        members.setdefault(key, []).append(row)
    keys = varying_keys([a.overrides for a in arms.values()])
    for key, arm in arms.items():
        arm.label = " ".join(f"{k}={arm.overrides.get(k, '—')}" for k in keys) or "all runs"
        rows_of = members.get(key, [])
        arm.stats = {m: spread([r.get(m) for r in rows_of]) for m, _ in MEASURES}
        if len(set(arm.seeds)) == len(arm.seeds):  # a seed run twice cannot be paired
            arm.by_seed = {m: {s: r[m] for s, r in zip(arm.seeds, rows_of)
                               if r.get(m) is not None and math.isfinite(r[m])}
                           for m, _ in MEASURES}
    return list(arms.values())


def _parse_reference(text: str) -> dict[str, str]:
    items = [t for t in text.replace(",", " ").split() if t]
    bad = [t for t in items if "=" not in t]
    if not items or bad:
        raise SystemExit(f"error: --reference {text!r}: give the reference arm as key=value "
                         "overrides, e.g. --reference balance=none")
    return {k.lstrip("+"): v for k, _, v in (t.partition("=") for t in items)}


def choose_reference(arms: list[Arm], runs: list[RunInfo], given: str | None
                     ) -> tuple[Arm, str | None]:
    """(the reference arm, a note when the preset's declared one was not swept). `given` (from
    --reference) must match exactly one arm; otherwise the runs' `experiment_reference`, else the
    first arm."""
    declared = next((r.config.get("experiment_reference") for r in runs
                     if r.config.get("experiment_reference")), None)
    text = given or declared
    if not text:
        return arms[0], None
    wanted = _parse_reference(text)
    found = [a for a in arms if all(a.overrides.get(k) == v for k, v in wanted.items())]
    if len(found) == 1:
        return found[0], None
    names = ", ".join(a.label for a in arms)
    if given:
        what = "no arm" if not found else f"{len(found)} arms"
        raise SystemExit(f"error: --reference {given!r} matches {what} (arms: {names}); name one "
                         "arm by the overrides that set it apart")
    if len(arms) == 1:  # nothing to compare: no note about the reference
        return arms[0], None
    return arms[0], (f"note: the preset's reference arm `{declared}` is not among the arms "
                     f"swept; comparing against the first arm, `{arms[0].label}` (choose one "
                     "with --reference).")


def _verdict(arm: Arm, reference: Arm) -> str:
    loss, load = arm.diffs.get(LOSS), arm.diffs.get(IMBALANCE)
    if loss is None:
        return "no finished run" if not arm.stats[LOSS].n else "no reference loss"
    if loss.within_noise is None:
        said = [f"loss {loss.value:+.4f}, one run: noise unknown, run more seeds"]
    elif loss.within_noise:
        said = ["same loss within noise"]
    else:
        said = [f"{'lower' if loss.value < 0 else 'higher'} loss ({loss.value:+.4f})"]
    if load is not None:
        versus = f"{arm.stats[IMBALANCE].mean:.2f} vs {reference.stats[IMBALANCE].mean:.2f}"
        if load.within_noise is None:
            said.append(f"load max/mean {versus} (noise unknown)")
        elif load.within_noise:
            said.append("same balance within noise")
        else:
            said.append(f"{'more' if load.value < 0 else 'less'} even load ({versus})")
    return "; ".join(said)


def compare_arms(arms: list[Arm], reference: Arm) -> None:
    """Fill each arm's differences against `reference` and its verdict."""
    for arm in arms:
        if arm is reference:
            arm.diffs, arm.verdict = {}, "reference"
            continue
        arm.diffs = {}
        for m, _ in MEASURES:
            d = (paired_difference(arm.by_seed.get(m, {}), reference.by_seed.get(m, {}))
                 or difference(arm.stats[m], reference.stats[m]))
            if d is not None:
                arm.diffs[m] = d
        arm.verdict = _verdict(arm, reference)


def _spread_cell(s: Spread, digits: int) -> str:
    if not s.n:
        return "—"
    if s.std is None:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.lo:.{digits}f}, {s.hi:.{digits}f}]"


def _diff_cell(d: Diff | None, digits: int) -> str:
    if d is None:
        return "—"
    noise = "noise unknown" if d.noise is None else f"± {d.noise:.{digits}f}"
    return f"{d.value:+.{digits}f} {noise}" + (f" (paired, {d.paired} seeds)" if d.paired else "")


def arms_markdown(arms: list[Arm], reference: Arm) -> str:
    """The per-arm table: runs, mean ± std [min, max] per measure, differences against the
    reference with their noise, verdict."""
    digits = {m: 2 if m == IMBALANCE else 4 for m, _ in MEASURES}
    shown = [(m, h) for m, h in MEASURES if any(a.stats[m].n for a in arms)]
    compared = [(m, h) for m, h in shown if m in (LOSS, EXACT_MATCH, IMBALANCE)]
    header = ["arm", "runs (seeds)", *(h for _, h in shown),
              *(f"Δ {h} vs reference" for _, h in compared), "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        runs = f"{len(arm.runs)} ({', '.join(arm.seeds)})" if arm.runs else "0"
        if arm.excluded:
            runs += f", not counted: {', '.join(arm.excluded)}"
        label = f"**{arm.label}**" if arm is reference else arm.label
        cells = [label, runs, *(_spread_cell(arm.stats[m], digits[m]) for m, _ in shown),
                 *(_diff_cell(arm.diffs.get(m), digits[m]) for m, _ in compared), arm.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
