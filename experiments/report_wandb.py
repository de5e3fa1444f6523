"""The W&B side of a sweep report: a wandb-workspaces report over exactly this sweep's runs.

Building the report object works offline; saving it needs a W&B server and a login, and the runs
must have been uploaded first (`wandb sync RUN_DIR/wandb/offline-run-*`).
"""

from __future__ import annotations

import os
from typing import Any

from experiments.report_runs import RunInfo, varying_keys
from h64lm.train.wandb_sink import flatten

__all__ = ["UNGROUPED_KEYS", "build_wandb_report", "groupby_keys", "server_problem"]

# Keys that vary between repeats of one setting (the seed, a resume): runs that differ only in
# these are averaged together in a W&B group instead of each forming its own, as they form one
# arm in the local report.
UNGROUPED_KEYS = ("train.seed", "train.resume", "experiment_name")


def groupby_keys(runs: list[RunInfo]) -> list[str]:
    """W&B groupby keys: the resolved-config keys that differ between runs. A group override
    (e.g. `arm=moe8`) shows up here as the model keys it changes.

    The W&B sink logs the config flattened ("model.num_experts"), which W&B stores as a flat
    dotted key, so the backend path is `config.<dotted key>.value`.
    """
    flat = [flatten(r.config) for r in runs]
    return [f"config.{k}.value" for k in varying_keys(flat) if k not in UNGROUPED_KEYS]


def _router_layers(runs: list[RunInfo]) -> list[str]:
    layers: dict[str, None] = {}
    for r in runs:
        for rec in r.records[-1:]:
            layers.update(dict.fromkeys(rec.get("router", {})))
    return sorted(layers, key=int)


def build_wandb_report(runs: list[RunInfo], table_markdown: str, entity: str, project: str,
                       title: str) -> Any:
    """A report with one runset (this sweep's runs, grouped by what varies) and panels for
    validation loss, perplexity, tokens/s and expert balance. Not saved here."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    ids = [r.wandb_id for r in runs if r.wandb_id]
    groups = sorted({r.config.get("experiment_name") or r.sweep.name for r in runs})
    # The run ids pin the runset to these directories: a rerun of the same preset shares the
    # W&B group but not the ids.
    filters = [expr.Metric("ID").isin(ids)] if ids else [expr.Metric("Group").isin(groups)]
    runset = wr.Runset(entity=entity, project=project, name=", ".join(groups), filters=filters,
                       groupby=groupby_keys(runs))
    layers = _router_layers(runs)
    panels = [
        wr.LinePlot(title="validation loss", x="tokens", y=["val_loss"]),
        wr.LinePlot(title="validation perplexity", x="tokens", y=["val_ppl"], log_y=True),
        wr.LinePlot(title="tokens/s", x="Step", y=["tokens_per_s"]),
    ]
    if layers:
        panels += [
            wr.LinePlot(title="expert load, max/mean (1 = even)", x="Step",
                        y=[f"router.{layer}.load_max_over_mean" for layer in layers]),
            wr.LinePlot(title="dropped token share", x="Step",
                        y=[f"router.{layer}.dropped" for layer in layers]),
        ]
    return wr.Report(
        project=project,
        entity=entity,
        title=title,
        description=f"Sweep {', '.join(groups)}: {len(runs)} runs.",
        blocks=[
            wr.H1(text=title),
            wr.PanelGrid(runsets=[runset], panels=panels),
            wr.H2(text="Runs (from the local run directories)"),
            wr.MarkdownBlock(text=table_markdown),
        ],
    )


def server_problem() -> str | None:
    """Why a report cannot be saved now, or None when a W&B server answers with a login."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    try:
        import wandb

        wandb.Api(timeout=15).viewer  # noqa: B018  (the request is the check)
    except Exception as e:  # noqa: BLE001  (no key, no network, wrong host: all "no server")
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
    return None
