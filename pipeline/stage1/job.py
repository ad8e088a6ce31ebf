"""Stage 1 as a job: open (or re-attach to) the run, log the inputs, train, log the outputs.

Under torchrun every rank trains; rank 0 alone opens the MLflow run and writes files.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipeline import config as C
from pipeline.checkpoint import STAGE1_FINAL, sha256_file
from pipeline.data import dataset_digest, dataset_profile, records_frame
from pipeline.device import device_params
from pipeline.stage1.trainer import STEP_STEM, Stage1Result, Stage1Trainer, build_stage1_inputs
from pipeline.tracking.runs import (log_dataset, log_files, log_metrics, log_new_params,
                                    name_run, resume_trainer, set_run_tags, stage_run)
from pipeline.tracking.sink import MetricsSink
from pipeline.train.common import file_logger, silent_logger
from pipeline.train.distributed import SINGLE, World
from pipeline.train.plots import plot_stage1
from pipeline.train.resume import resume_point


class Stage1Job:
    """Everything around the Stage 1 training loop."""

    def __init__(self, cfg: C.Stage1Config, profile: str, resume: str | None = None,
                 echo: Callable[[str], None] = print, world: World = SINGLE):
        self.cfg, self.profile, self.resume, self.echo, self.world = cfg, profile, resume, echo, world
        self.run_id: str | None = None
        self.out_dir: Path | None = None

    def _resume_point(self) -> tuple[Path, dict] | None:
        """The step checkpoint to continue (`--resume auto|FOLDER`); adopts its config."""
        found, _ = resume_point(self.resume, self.cfg.output_dir, STEP_STEM, STAGE1_FINAL,
                                self.cfg, self.world.size)
        if found is None:
            if self.resume is not None:
                self.echo(f"resume: no interrupted Stage 1 run of this config under "
                          f"{self.cfg.output_dir}; starting a new one")
            return None
        meta = found[1]
        self.cfg = C.from_dict(C.Stage1Config, meta["config"])
        self.profile = meta.get("profile", self.profile)
        return found

    def run(self) -> Stage1Result:
        """Train (or resume) one Stage 1 run; returns its result."""
        resume_point = self._resume_point()
        inputs = build_stage1_inputs(self.cfg, self.world)
        if not self.world.is_main:  # trains in step with rank 0; tracks and writes nothing
            trainer = Stage1Trainer(self.cfg, inputs.model, inputs.loaders, inputs.probe_images,
                                    self.cfg.output_dir, "", lambda m, s: None, lambda t: None,
                                    silent_logger("stage1.rank"), self.profile, world=self.world)
            if resume_point is not None:
                trainer.restore(resume_point[0], resume_point[1]["resume"])
            return trainer.fit()
        with stage_run("stage1", run_id=resume_point[1]["run_id"] if resume_point else None) as run:
            return self._run_main(run, inputs, resume_point)

    def _run_main(self, run, inputs, resume_point) -> Stage1Result:
        cfg = self.cfg
        self.run_id = run.info.run_id
        name_run(f"stage1 {cfg.objective} lr={cfg.lr:g} {self.profile}")
        self.out_dir = out = Path(cfg.output_dir) / self.run_id
        earlier_logs = sorted(out.glob(f"stage1_lr{cfg.lr:g}_bs{cfg.batch_size}_*.log"))
        log_path = earlier_logs[0] if earlier_logs else \
            out / f"stage1_lr{cfg.lr:g}_bs{cfg.batch_size}_{time.strftime('%Y%m%d_%H%M')}.log"
        logger = file_logger("stage1", log_path)
        log_new_params({**C.flatten(cfg), "profile": self.profile,
                        "batch_size_per_rank": cfg.batch_size, "world_size": self.world.size,
                        "global_batch_size": inputs.loaders.global_batch_size,
                        **device_params(self.world.device)})
        if resume_point is None:
            log_dataset(records_frame(inputs.records), source=cfg.data.source,
                        name="stage1-data", digest=dataset_digest(inputs.records),
                        context="training", profile=dataset_profile(inputs.records))
        config_path = C.save_json(cfg, out / "stage1_config.json")
        sink = MetricsSink(self.run_id, flush_every=10**9)  # flushed at each step checkpoint
        trainer = Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images, out,
                                self.run_id, sink, sink.set_tags, logger, profile=self.profile,
                                flush=sink.flush, world=self.world)
        if resume_point is not None:
            resume_trainer(self.run_id, trainer, *resume_point, logger)
        logger.info("stage1 run %s: objective=%s lr=%g bs=%d x %d ranks epochs=%d, output in %s",
                    self.run_id, cfg.objective, cfg.lr, cfg.batch_size, self.world.size,
                    cfg.epochs, out)
        try:
            with sink.around_training():
                result = trainer.fit()
        finally:
            self._log_outputs(trainer, [log_path, config_path])
        log_metrics({"final_train_loss": result.final_train_loss})
        set_run_tags({"stage1.objective": cfg.objective})
        logger.info("final_train_loss %.6g; artifacts under %s", result.final_train_loss,
                    run.info.artifact_uri)
        return result

    def _log_outputs(self, trainer: Stage1Trainer, files) -> None:
        """Log checkpoints (with their sha256 as tags), logs, CSV, config and the curves plot."""
        cfg = self.cfg
        plot = plot_stage1(trainer.history(), self.out_dir / "stage1_curves.png",
                           cfg.health.floors(), title=f"Stage 1 {cfg.objective} lr={cfg.lr:g}")
        checkpoints = {name: path for name, path in trainer.result.checkpoints.items()
                       if path.exists()}
        set_run_tags({f"checkpoint.{name}.sha256": sha256_file(path)
                      for name, path in checkpoints.items()})
        log_files(checkpoints.values(), "checkpoints")
        log_files(files[:1], "logs")
        log_files(files[1:], "config")
        log_files([trainer.csv_path])
        log_files([plot], "plots")
