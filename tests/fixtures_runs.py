"""A small, realistic tracking history written with the public MlflowClient API (no training).

`populate(tracking_uri, artifact_root)` creates, in the experiment `radiology-report-vlm`:
- Stage 1 `stage1-l2proxy-lr1e-4`: the collapse (l2_proxy, lr 1e-4): train loss decays to
  ~5e-5 while `health_feature_std` falls to 1e-5; gate rejected with reasons.
- Stage 1 `stage1-vicreg-lr1e-5`: healthy (vicreg, lr 1e-5): loss stays above 1, health fine;
  gate approved.
- one validate run per Stage 1 run, carrying the same verdict.
- Stage 2 `stage2-in-band` (inside the healthy bands) and `stage2-too-fast` (drops far below
  them, the label-masking symptom).
- one evaluate run of `stage2-in-band`.
Points go in with `log_batch` (one sqlite commit per batch instead of one per point).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import Stage2Config
from pipeline.train.curve import band_at

EXPERIMENT = "radiology-report-vlm"
T0 = 1_767_000_000_000  # ms; a fixed clock keeps runs in a known order
STEPS_PER_EPOCH = 10


def _log(client: MlflowClient, run_id: str, metrics=(), params=None, tags=None) -> None:
    metrics = list(metrics)
    params = [Param(k, str(v)) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client.log_batch(run_id, metrics=metrics[:1000], params=params, tags=tags)
    for i in range(1000, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def _run(client, experiment_id, name, stage, start, **log) -> str:
    run = client.create_run(experiment_id, start_time=start, run_name=name,
                            tags={"pipeline.stage": stage})
    _log(client, run.info.run_id, **log)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=start + 60_000)
    return run.info.run_id


def _stage1_metrics(start, epochs, loss_at, health_at):
    """Per-step `train_loss`, per-epoch losses and health, and `final_train_loss`."""
    metrics, final = [], float("nan")
    for epoch in range(1, epochs + 1):
        losses = [loss_at((epoch - 1) * STEPS_PER_EPOCH + i) for i in range(STEPS_PER_EPOCH)]
        for i, loss in enumerate(losses):
            step = (epoch - 1) * STEPS_PER_EPOCH + i
            metrics.append(Metric("train_loss", loss, start + step * 100, step))
        final = sum(losses) / len(losses)
        ts = start + epoch * STEPS_PER_EPOCH * 100
        per_epoch = {"epoch_train_loss": final, "val_loss": final * 1.05, **health_at(epoch)}
        metrics += [Metric(k, v, ts, epoch) for k, v in per_epoch.items()]
    metrics.append(Metric("final_train_loss", final, start + 59_000, 0))
    return metrics, final


def populate(tracking_uri: str, artifact_root: str | Path) -> dict[str, str]:
    """Write the history into `tracking_uri`; returns {run name: run id} plus `experiment_id`."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT,
                                             artifact_location=Path(artifact_root).as_uri())
    rng = random.Random(0)
    ids = {"experiment_id": experiment_id}
    epochs = 5

    # Collapse: loss 1 -> 5e-5 geometrically over 50 steps, features shrink to nothing.
    last = epochs * STEPS_PER_EPOCH - 1
    metrics, final = _stage1_metrics(
        T0, epochs, lambda s: 1.0 * (5e-5) ** (s / last) * (1 + 0.05 * rng.random()),
        lambda e: {"health_feature_std": 0.4 * (1e-5 / 0.4) ** ((e - 1) / (epochs - 1)),
                   "health_normalized_std": 0.9 * (0.01 / 0.9) ** ((e - 1) / (epochs - 1)),
                   "health_effective_rank": 1.0 + 11.0 * (1 - (e - 1) / (epochs - 1)) ** 2})
    reasons = (f"final_train_loss={final:.3g} < min_final_loss 0.001; lr=0.0001 > max_lr 1e-05; "
               "health_feature_std=1e-05 < 0.001; health_normalized_std=0.01 < 0.1; "
               "health_effective_rank=1 < 2")
    verdicts = {"gate.verdict": "rejected", "gate.reasons": reasons}
    ids["stage1-l2proxy-lr1e-4"] = _run(
        client, experiment_id, "stage1-l2proxy-lr1e-4", "stage1", T0, metrics=metrics,
        params={"lr": "1e-4", "objective": "l2_proxy", "batch_size": 2, "epochs": epochs},
        tags={**verdicts, "health.collapse_suspected": "true"})

    # Healthy VICReg: loss falls from ~9 to ~3 and stays well above 1.
    start = T0 + 3_600_000
    metrics, _ = _stage1_metrics(
        start, epochs, lambda s: 3.0 + 6.0 * math.exp(-s / 15) + 0.2 * rng.random(),
        lambda e: {"health_feature_std": 0.35 + 0.02 * e, "health_normalized_std": 0.8,
                   "health_effective_rank": 11.0 + 0.5 * e})
    ids["stage1-vicreg-lr1e-5"] = _run(
        client, experiment_id, "stage1-vicreg-lr1e-5", "stage1", start, metrics=metrics,
        params={"lr": "1e-5", "objective": "vicreg", "batch_size": 2, "epochs": epochs},
        tags={"gate.verdict": "approved", "gate.reasons": ""})

    for offset, (name, verdict, why) in enumerate([("stage1-l2proxy-lr1e-4", "rejected", reasons),
                                                  ("stage1-vicreg-lr1e-5", "approved", "")]):
        ids[f"validate-{name}"] = _run(
            client, experiment_id, f"validate-{name}", "validate", start + (2 + offset) * 60_000,
            params={"stage1_run": ids[name]},
            tags={"gate.verdict": verdict, "gate.reasons": why, "gate.source_run": ids[name]})

    # Stage 2: one run tracking the middle of the healthy band, one falling far below it.
    bands = Stage2Config().bands
    s2_epochs = 20
    for offset, (name, lr, curve) in enumerate([
            ("stage2-in-band", "2e-5", lambda e: sum(band_at(bands, e)) / 2),
            ("stage2-too-fast", "1e-3", lambda e: max(0.03, 4.0 * math.exp(-1.2 * e)))]):
        start = T0 + (2 + offset) * 3_600_000
        metrics = []
        for epoch in range(1, s2_epochs + 1):
            losses = []
            for i in range(STEPS_PER_EPOCH):
                step = (epoch - 1) * STEPS_PER_EPOCH + i
                at = epoch - 1 + (i + 1) / STEPS_PER_EPOCH
                losses.append(curve(at) * (1 + 0.1 * rng.random()))
                metrics.append(Metric("train_loss", losses[-1], start + step * 100, step))
            train = sum(losses) / len(losses)
            low, high = band_at(bands, epoch)
            metrics += [Metric(k, v, start + epoch * 1000, epoch) for k, v in
                        {"epoch_train_loss": train, "val_loss": train * 1.1,
                         "curve_in_band": float(low <= train <= high)}.items()]
        metrics.append(Metric("final_train_loss", train, start + 59_000, 0))
        ids[name] = _run(client, experiment_id, name, "stage2", start, metrics=metrics,
                         params={"lr": lr, "batch_size": 2, "epochs": s2_epochs, "init": "auto"})

    scores = {"bleu4": 0.121, "cider": 0.342, "rouge_l": 0.287, "meteor": 0.151,
              "finding_macro_f1": 0.412, "distinct_share": 0.78}
    metrics = [Metric(f"{mode}_{k}", v * (1.04 if mode == "beam" else 1.0), T0, 0)
               for mode in ("greedy", "beam") for k, v in scores.items()]
    metrics.append(Metric("score", 0.301, T0, 0))
    ids["evaluate-stage2-in-band"] = _run(
        client, experiment_id, "evaluate-stage2-in-band", "evaluate", T0 + 5 * 3_600_000,
        metrics=metrics, params={"model": ids["stage2-in-band"], "split": "test"},
        tags={"eval.source_run": ids["stage2-in-band"]})
    return ids
