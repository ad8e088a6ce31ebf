"""What the gate judges: evidence from a Stage 1 run's tracking record, or from a bare checkpoint."""
from __future__ import annotations

from pathlib import Path

from pipeline import config as C
from pipeline.checkpoint import STAGE1_FINAL, final_checkpoint_path, read_metadata, sha256_file
from pipeline.gate.rules import Evidence, stored_float
from pipeline.models.loading import load_vision_bridge
from pipeline.tracking.registry import run_verdict
from pipeline.tracking.runs import download_run_artifact, get_run
from pipeline.train.health import probe_health, probe_images


def recorded_profile(run_id: str | None = None, checkpoint: str | Path | None = None) -> str | None:
    """The profile a Stage 1 run logged (param `profile`) or a checkpoint's metadata names."""
    if checkpoint is not None:
        if Path(checkpoint).suffix != ".safetensors":
            return None  # a legacy .pt carries no metadata
        metadata = read_metadata(checkpoint)
        config = metadata.get("config")
        profile = metadata.get("profile") or (config.get("profile")
                                              if isinstance(config, dict) else None)
    else:
        profile = get_run(run_id).data.params.get("profile") if run_id else None
    return profile if profile in C.PROFILES else None


def run_evidence(run_id: str, checkpoint_name: str = STAGE1_FINAL):
    """(Evidence, local checkpoint path or None) for a Stage 1 run, from what it logged."""
    run = get_run(run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    path = download_run_artifact(run_id, final_checkpoint_path(checkpoint_name))
    # Under `mlflow run`, params hold what was passed ("auto"); the value the run used is in
    # `resolved.<key>` (see tracking.runs.log_new_params).
    params = {**params, **{k.removeprefix("resolved."): v for k, v in params.items()
                           if k.startswith("resolved.")}}
    lr = params.get("lr")
    try:
        lr = float(lr) if lr is not None else None
    except ValueError:
        lr = None
    health = {k.removeprefix("health_"): stored_float(v) for k, v in metrics.items()
              if k.startswith("health_")}
    evidence = Evidence(
        source="run", status=run.info.status,
        final_train_loss=stored_float(metrics.get("final_train_loss")),
        lr=lr, objective=params.get("objective"), health=health,
        checkpoint_found=path is not None and path.exists(),
        sha256_recorded=tags.get(f"checkpoint.{checkpoint_name}.sha256"),
        sha256_actual=sha256_file(path) if path is not None and path.exists() else None)
    return evidence, path


def checkpoint_evidence(path: str | Path, profile: str, data: str):
    """(Evidence, metadata) for a bare checkpoint: its feature health on a probe batch."""
    fallback = C.build(C.Stage1Config, profile, {"data.source": data})
    model, metadata, cfg = load_vision_bridge(path, fallback)
    images = probe_images(cfg.data if metadata.get("config") else fallback.data,
                          cfg.encoder.image_size, cfg.health.probe_size)
    health = probe_health(model, images)
    source_run = metadata.get("run_id") if isinstance(metadata.get("run_id"), str) else None
    return Evidence(source="checkpoint", health=health, checkpoint_found=True,
                    objective=metadata.get("objective"), lr=_number(metadata.get("lr")),
                    final_train_loss=_number(metadata.get("final_loss")),
                    source_verdict=run_verdict(source_run)), metadata


def _number(value) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
