"""Read-only views of the tracking store for comparing runs: tables and figures.

Reads every experiment of the current tracking URI and never writes to it. Runs are found
by their `pipeline.stage` tag. Figures are built with `matplotlib.figure.Figure` (no pyplot
state, no backend choice), so a notebook shows them as the value of a cell and a script
saves them with `path=`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline.config import COLLAPSE_TAG, HEALTH_KEYS as _HEALTH_KEYS, HealthConfig
from pipeline.train.curve import band_at
from pipeline.tracking.registry import REASONS_TAG, VERDICT_TAG
from pipeline.tracking.runs import STAGE_TAG, all_experiment_ids

HEALTH_KEYS = tuple(f"health_{key}" for key in _HEALTH_KEYS)
PARAMS = {"stage1": ("lr", "objective", "batch_size"), "stage2": ("lr", "batch_size", "init"),
          "evaluate": ("model", "split")}
TAGS = {VERDICT_TAG: "gate_verdict", REASONS_TAG: "gate_reasons", "gate.source_run": "source_run",
        "eval.source_run": "source_run", COLLAPSE_TAG: "collapse_suspected",
        "champion.verdict": "champion_verdict", "champion.reasons": "champion_reasons",
        "stage2.image_ignored": "image_ignored"}
BASE_COLUMNS = ["run_id", "run_name", "experiment_id", "status", "start_time"]


def _search(stage: str, client: MlflowClient) -> list:
    experiment_ids = all_experiment_ids(client)
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def stage_runs(stage: str, client: MlflowClient | None = None) -> pd.DataFrame:
    """One row per run of `stage`, newest first: identity, params of interest, last metric
    values, gate verdict/reasons and the collapse flag."""
    rows = []
    for run in _search(stage, client or MlflowClient()):
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name,
               "experiment_id": run.info.experiment_id, "status": run.info.status,
               "start_time": pd.to_datetime(run.info.start_time, unit="ms")}
        # `resolved.<key>` holds the value a step used where the run was given "auto".
        row |= {key: run.data.params.get(f"resolved.{key}", run.data.params.get(key))
                for key in PARAMS.get(stage, ("lr",))}
        row |= {column: run.data.tags[tag] for tag, column in TAGS.items() if tag in run.data.tags}
        row |= {k: v for k, v in run.data.metrics.items() if k not in row}  # never shadow a param
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else BASE_COLUMNS)
    if "collapse_suspected" in frame:
        frame["collapse_suspected"] = frame["collapse_suspected"].eq("true")
    return frame


def metric_curves(run_ids: Iterable[str], key: str,
                  client: MlflowClient | None = None) -> pd.DataFrame:
    """Full history of metric `key` for each run: columns run_id, step, value."""
    client = client or MlflowClient()
    rows = [(run_id, m.step, m.value, m.timestamp)
            for run_id in run_ids for m in client.get_metric_history(run_id, key)]
    frame = pd.DataFrame(rows, columns=["run_id", "step", "value", "timestamp"])
    # A resumed run may log a step twice; the later point is the one that counts.
    frame = frame.sort_values(["run_id", "step", "timestamp"], kind="stable")
    frame = frame.drop_duplicates(["run_id", "step"], keep="last")
    return frame.drop(columns="timestamp").reset_index(drop=True)


def gate_table(client: MlflowClient | None = None) -> pd.DataFrame:
    """One row per Stage 1 run: lr, objective, final loss, health and the gate's verdict.

    The verdict comes from the Stage 1 run's own tag, else from the newest validate run that
    names it as `gate.source_run`; never-validated runs read "not validated".
    """
    client = client or MlflowClient()
    stage1, validate = stage_runs("stage1", client), stage_runs("validate", client)
    columns = ["run_id", "run_name", "lr", "objective", "final_train_loss", *HEALTH_KEYS,
               "gate_verdict", "gate_reasons", "validate_run"]
    if stage1.empty:
        return pd.DataFrame(columns=columns)
    frame = stage1.reindex(columns=[c for c in columns if c != "validate_run"])
    if not validate.empty and "source_run" in validate:
        latest = validate[validate["source_run"].fillna("") != ""]  # "" = a checkpoint file
        latest = latest.drop_duplicates("source_run")
        latest = latest.set_index("source_run")  # newest first, so the first is the latest
        frame["validate_run"] = frame["run_id"].map(latest["run_id"])
        for column in ("gate_verdict", "gate_reasons"):
            if column in latest:
                frame[column] = frame[column].fillna(frame["run_id"].map(latest[column]))
    else:
        frame["validate_run"] = None
    frame["gate_verdict"] = frame["gate_verdict"].fillna("not validated")
    frame["gate_reasons"] = frame["gate_reasons"].fillna("")
    return frame.reset_index(drop=True)


def eval_table(client: MlflowClient | None = None) -> pd.DataFrame:
    """One row per evaluate run, best `score` first: source run and every quality metric."""
    frame = stage_runs("evaluate", client)
    if frame.empty:
        return frame
    metrics = sorted(c for c in frame.columns if c.startswith(("greedy_", "beam_")))
    keep = ["run_id", "run_name", "start_time", "source_run", "score", *metrics]
    frame = frame.reindex(columns=keep)
    return frame.sort_values("score", ascending=False, na_position="last").reset_index(drop=True)


SUMMARY = {"coarse_f1": "finding_coarse_macro_f1", "fine_f1": "finding_macro_f1",
           "bleu4": "bleu4", "cider": "cider", "distinct": "distinct_share"}


def eval_summary(client: MlflowClient | None = None) -> pd.DataFrame:
    """One compact row per evaluate run, best score first: the model's key scores beside the
    blind baseline's, the grounding gap and the champion verdict (last decoding's scores)."""
    frame = stage_runs("evaluate", client)
    columns = ["run_name", "source_run", "coarse_f1", "blind_coarse_f1", "fine_f1",
               "blind_fine_f1", "grounding_gap", "bleu4", "cider", "distinct", "score",
               "champion_verdict", "champion_reasons"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = frame.reindex(columns=["run_name", "source_run", "grounding_gap", "score",
                                 "champion_verdict", "champion_reasons"])
    for name, key in SUMMARY.items():
        beam, greedy = frame.get(f"beam_{key}"), frame.get(f"greedy_{key}")
        out[name] = beam.fillna(greedy) if beam is not None and greedy is not None else \
            (beam if beam is not None else greedy)
    for name in ("coarse_f1", "fine_f1"):
        out[f"blind_{name}"] = frame.get(f"blind_{SUMMARY[name]}")
    out = out.reindex(columns=columns).sort_values("score", ascending=False, na_position="last")
    return out.reset_index(drop=True)


def sample_reports(run_id: str, n: int = 3) -> pd.DataFrame:
    """The first `n` reports an evaluate run wrote, beside their references (empty when the
    run logged none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        table = mlflow.artifacts.load_dict(f"runs:/{run_id}/reports.json")
    except (MlflowException, OSError):
        return pd.DataFrame(columns=["id", "generated", "reference"])
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    generated = [c for c in frame.columns if c.startswith("generated_")]
    return frame.reindex(columns=["id", *generated[-1:], "reference"]).head(n)


def _label(row: pd.Series) -> str:
    name = row.get("run_name") or row["run_id"][:8]
    return f"{name} (lr={row.get('lr')}, {row.get('objective')})"


def _is_collapsed(row: pd.Series) -> bool:
    flagged = row.get("collapse_suspected")
    feature_std = row.get("health_feature_std")
    return (isinstance(flagged, (bool, np.bool_)) and bool(flagged)) or bool(
        pd.notna(feature_std) and feature_std < HealthConfig().min_feature_std)


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def plot_stage1(runs_df: pd.DataFrame, path: str | Path | None = None,
                client: MlflowClient | None = None) -> Figure:
    """Per-step train loss (log scale) and the three health curves, one line per run;
    collapsed runs are drawn red and dashed, health floors as dotted lines."""
    client = client or MlflowClient()
    fig = Figure(figsize=(18, 4.2))
    axes = fig.subplots(1, 4)
    floor_of = HealthConfig().floors(prefix="health_")
    palette = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"] * 10)
    curves = {key: metric_curves(runs_df["run_id"], key, client)
              for key in ("train_loss", *HEALTH_KEYS)}
    for _, row in runs_df.iterrows():
        collapsed = _is_collapsed(row)
        style = (dict(color="tab:red", ls="--", lw=1.8) if collapsed
                 else dict(color=next(palette), lw=1.2))
        label = _label(row) + (" [collapsed]" if collapsed else "")
        for ax, key in zip(axes, ("train_loss", *HEALTH_KEYS)):
            curve = curves[key][curves[key]["run_id"] == row["run_id"]]
            if not curve.empty:
                ax.plot(curve["step"], curve["value"], marker=None if key == "train_loss" else "o",
                        ms=3, label=label, **style)
    axes[0].set(yscale="log", xlabel="step", title="train_loss (log)")
    axes[0].axhline(1e-3, color="grey", ls=":", lw=0.8)
    for ax, key in zip(axes[1:], HEALTH_KEYS):
        ax.axhline(floor_of[key], color="grey", ls=":", lw=0.8)
        ax.set(xlabel="epoch", title=f"{key} (floor {floor_of[key]:g})")
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(handles)), fontsize=8)
    fig.suptitle("Stage 1: loss and feature health (dotted = collapse thresholds)")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return _save(fig, path)


def plot_stage2(run_ids: Sequence[str], bands: Sequence[tuple[float, float, float]],
                path: str | Path | None = None, client: MlflowClient | None = None) -> Figure:
    """Caption loss per epoch (train solid, val dotted) of several runs over the shaded band."""
    client = client or MlflowClient()
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    train = metric_curves(run_ids, "epoch_train_loss", client)
    val = metric_curves(run_ids, "val_loss", client)
    first = min(e for e, _, _ in bands)
    last = max(float(train["step"].max()) if not train.empty else 0.0, first + 1)
    epochs = [first + i * (last - first) / 200 for i in range(201)]
    lows, highs = zip(*(band_at(bands, e) for e in epochs))
    ax.fill_between(epochs, lows, highs, color="green", alpha=0.15, label="healthy band")
    palette = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink"] * 10
    for run_id, color in zip(run_ids, palette):
        run = client.get_run(run_id)
        in_band = run.data.metrics.get("curve_in_band")
        label = f"{run.info.run_name} (lr={run.data.params.get('lr')}"
        label += ")" if in_band is None else f", in band: {'yes' if in_band else 'no'})"
        curve = train[train["run_id"] == run_id]
        ax.plot(curve["step"], curve["value"], "o-", ms=3, color=color, label=label)
        curve = val[val["run_id"] == run_id]
        ax.plot(curve["step"], curve["value"], ":", color=color, lw=1)
    ax.set(xlabel="epoch", ylabel="caption cross-entropy", yscale="log",
           title="Stage 2 caption loss per epoch (solid train, dotted val)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
