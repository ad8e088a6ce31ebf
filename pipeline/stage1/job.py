"""Stage 1 as a job: open the run, log the inputs, train, log the outputs (mirrors Stage2Job)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipeline import config as C
from pipeline.checkpoint import sha256_file
from pipeline.data import dataset_digest, dataset_profile, records_frame
from pipeline.stage1.trainer import Stage1Result, Stage1Trainer, build_stage1_inputs
from pipeline.tracking.runs import (log_dataset, log_files, log_metrics, log_new_params,
                                    name_run, set_run_tags, stage_run)
from pipeline.tracking.sink import MetricsSink
from pipeline.train.common import file_logger
from pipeline.train.plots import plot_stage1


class Stage1Job:
    """Everything around the Stage 1 training loop."""

    def __init__(self, cfg: C.Stage1Config, profile: str, echo: Callable[[str], None] = print):
        self.cfg, self.profile, self.echo = cfg, profile, echo
        self.run_id: str | None = None
        self.out_dir: Path | None = None

    def run(self) -> Stage1Result:
        """Train one Stage 1 run; returns its result."""
        cfg = self.cfg
        inputs = build_stage1_inputs(cfg)
        with stage_run("stage1") as run:
            self.run_id = run.info.run_id
            name_run(f"stage1 {cfg.objective} lr={cfg.lr:g} {self.profile}")
            self.out_dir = out = Path(cfg.output_dir) / self.run_id
            stamp = time.strftime('%Y%m%d_%H%M')
            log_path = out / f"stage1_lr{cfg.lr:g}_bs{cfg.batch_size}_{stamp}.log"
            logger = file_logger("stage1", log_path)
            log_new_params({**C.flatten(cfg), "profile": self.profile})
            log_dataset(records_frame(inputs.records), source=cfg.data.source, name="stage1-data",
                        digest=dataset_digest(inputs.records), context="training",
                        profile=dataset_profile(inputs.records))
            config_path = C.save_json(cfg, out / "stage1_config.json")
            sink = MetricsSink(self.run_id)
            trainer = Stage1Trainer(cfg, inputs.model, inputs.train_loader, inputs.val_loader,
                                    inputs.probe_images, out, self.run_id, sink, sink.set_tags,
                                    logger, profile=self.profile)
            logger.info("stage1 run %s: objective=%s lr=%g bs=%d epochs=%d, output in %s",
                        self.run_id, cfg.objective, cfg.lr, cfg.batch_size, cfg.epochs, out)
            try:
                result = trainer.fit()
            finally:
                sink.drain()
                self._log_outputs(trainer, sink, [log_path, config_path])
            log_metrics({"final_train_loss": result.final_train_loss})
            set_run_tags({"stage1.objective": cfg.objective})
            logger.info("final_train_loss %.6g; artifacts under %s", result.final_train_loss,
                        run.info.artifact_uri)
        return result

    def _log_outputs(self, trainer: Stage1Trainer, sink: MetricsSink, files) -> None:
        """Log checkpoints (with their sha256 as tags), logs, config and the curves plot."""
        cfg = self.cfg
        plot = plot_stage1(sink.history, self.out_dir / "stage1_curves.png",
                           cfg.health.floors(), title=f"Stage 1 {cfg.objective} lr={cfg.lr:g}")
        set_run_tags({f"checkpoint.{name}.sha256": sha256_file(path)
                      for name, path in trainer.result.checkpoints.items()})
        log_files(trainer.result.checkpoints.values(), "checkpoints")
        log_files(files[:1], "logs")
        log_files(files[1:], "config")
        log_files([plot], "plots")
