"""Stage 1: train vision + bridge without the LLM.

Reads: the data (`synthetic` or an annotation/CSV/JSONL path).
Writes (run artifacts): `checkpoints/vision_bridge_{best_val,final,step<N>}.safetensors`,
`logs/stage1_lr{lr}_bs{bs}_{YYYYmmdd_HHMM}.log`, `plots/stage1_curves.png`,
`config/stage1_config.json`; metrics `train_loss`, `val_loss`, `health_*`, `final_train_loss`.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import mlflow

from pipeline import config as C
from pipeline.checkpoint import sha256_file
from pipeline.data import dataset_digest, dataset_profile, records_frame
from pipeline.train.plots import plot_stage1
from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs
from pipeline.tracking.runs import MetricsSink, log_dataset, log_files, log_new_params, stage_run
from pipeline.train.common import file_logger
from steps.common import auto, one_line_errors, profile_option


@click.command()
@profile_option
@click.option("--data", default="synthetic", show_default=True)
@click.option("--image_dir", "--image-dir", default=None)
@click.option("--epochs", default="auto", help="default: the profile's")
@click.option("--lr", default="1e-5", show_default=True)
@click.option("--batch_size", "--batch-size", default="2", show_default=True)
@click.option("--objective", type=click.Choice(["vicreg", "l2_proxy"]), default="vicreg",
              show_default=True, help="vicreg cannot collapse; l2_proxy is the old proxy")
@click.option("--max_visual_tokens", "--max-visual-tokens", default="96", show_default=True)
@click.option("--seed", default="0", show_default=True)
@click.option("--output_dir", "--output-dir", default="outputs/stage1", show_default=True)
@one_line_errors
def main(profile, data, image_dir, epochs, lr, batch_size, objective, max_visual_tokens, seed,
         output_dir):
    """Train vision + bridge (no LLM) and track the run in MLflow."""
    cfg = C.build(C.Stage1Config, profile, {
        "data.source": data, "data.image_dir": image_dir, "epochs": auto(epochs, int),
        "lr": auto(lr, float), "batch_size": auto(batch_size, int), "objective": objective,
        "bridge.max_visual_tokens": auto(max_visual_tokens, int), "seed": auto(seed, int),
        "output_dir": output_dir})
    inputs = build_stage1_inputs(cfg)
    with stage_run("stage1") as run:
        run_id = run.info.run_id
        out = Path(cfg.output_dir) / run_id
        log_path = out / f"stage1_lr{cfg.lr:g}_bs{cfg.batch_size}_{time.strftime('%Y%m%d_%H%M')}.log"
        logger = file_logger("stage1", log_path)
        log_new_params({**C.flatten(cfg), "profile": profile})
        log_dataset(records_frame(inputs.records), source=cfg.data.source, name="stage1-data",
                    digest=dataset_digest(inputs.records), context="training",
                    profile=dataset_profile(inputs.records))
        config_path = C.save_json(cfg, out / "stage1_config.json")
        sink = MetricsSink(run_id)
        trainer = Stage1Trainer(cfg, inputs.model, inputs.train_loader, inputs.val_loader,
                                inputs.probe_images, out, run_id, sink, mlflow.set_tags, logger)
        logger.info("stage1 run %s: objective=%s lr=%g bs=%d epochs=%d, output in %s",
                    run_id, cfg.objective, cfg.lr, cfg.batch_size, cfg.epochs, out)
        try:
            result = trainer.fit()
        finally:
            sink.flush()
            _log_outputs(cfg, trainer, sink, out, [log_path, config_path])
        mlflow.log_metric("final_train_loss", result.final_train_loss)
        mlflow.set_tag("stage1.objective", cfg.objective)
        logger.info("final_train_loss %.6g; artifacts under %s", result.final_train_loss,
                    run.info.artifact_uri)


def _log_outputs(cfg, trainer, sink, out, files) -> None:
    """Log checkpoints (with their sha256 as tags), logs, config and the curves plot."""
    floors = {"feature_std": cfg.health.min_feature_std,
              "normalized_std": cfg.health.min_normalized_std,
              "effective_rank": cfg.health.min_effective_rank}
    plot = plot_stage1(sink.history, out / "stage1_curves.png", floors,
                       title=f"Stage 1 {cfg.objective} lr={cfg.lr:g}")
    for name, path in trainer.result.checkpoints.items():
        mlflow.set_tag(f"checkpoint.{name}.sha256", sha256_file(path))
    log_files(trainer.result.checkpoints.values(), "checkpoints")
    log_files(files[:1], "logs")
    log_files(files[1:], "config")
    log_files([plot], "plots")


if __name__ == "__main__":
    main()
