"""A Stage 2 job: choose the initialisation or resume point, open the run, train, record.

MLflow is reached only through `pipeline.tracking.runs` and `pipeline.tracking.registry`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from pipeline import config as C
from pipeline.checkpoint import STAGE2_FINAL, load_checkpoint, sha256_file
from pipeline.data import dataset_digest, dataset_profile, load_dataset, records_frame
from pipeline.train.plots import plot_stage2
from pipeline.tracking.registry import model_version_run, register_report_model, run_verdict
from pipeline.stage2.trainer import STEP_STEM, Stage2Result, Stage2Trainer
from pipeline.models.loading import load_into, model_tensors, output_width, verify_base_llm
from pipeline.stage2.init import (InitChoice, adopt_architecture, choose_init,
                                  initial_adapters, refuse_if_unfit, refuse_width_mismatch)
from pipeline.tracking.runs import (log_dataset, log_files, log_new_params, name_run,
                                    resume_trainer, set_run_tags, stage_run)
from pipeline.tracking.sink import MetricsSink
from pipeline.device import device_params, place, to_device, train_precision
from pipeline.guards import GuardError
from pipeline.models.llm import TrainableLLMError
from pipeline.train.common import EpochLoaders, file_logger, seed_everything, silent_logger
from pipeline.train.distributed import SINGLE, World
from pipeline.train.resume import find_resumable, resume_point


class Stage2Job:
    """Everything around the Stage 2 training loop."""

    def __init__(self, cfg: C.Stage2Config, profile: str, init: str, force_init: bool = False,
                 resume: str | None = None, echo: Callable[[str], None] = print,
                 label_fn=None, llm=None, world: World = SINGLE):
        self.cfg, self.profile, self.init, self.force_init = cfg, profile, init, force_init
        self.world = world
        self.resume, self.echo, self.label_fn, self.llm = resume, echo, label_fn, llm
        self.run_id: str | None = None
        self.out_dir: Path | None = None
        self.not_resumed = ""  # the interrupted runs init auto/latest passed over, and why
        self.init_adapters = None  # the LLM adapters of an initial Stage 2 checkpoint

    def _resume_point(self):
        """The step checkpoint to continue (`--resume auto|FOLDER`, or with init auto/latest
        an interrupted run of this very config, others passed over); adopts its config."""
        if self.resume is None and self.init in ("auto", "latest"):
            found, skipped = find_resumable(self.cfg.output_dir, STEP_STEM, STAGE2_FINAL,
                                            self.cfg, self.world.size)
            self.not_resumed = f" (interrupted runs not resumed: {'; '.join(skipped)})" \
                if skipped else ""
        else:
            found, _ = resume_point(self.resume, self.cfg.output_dir, STEP_STEM, STAGE2_FINAL,
                                    self.cfg, self.world.size)
        if found is None:
            return None
        self.cfg = C.from_dict(C.Stage2Config, found[1]["config"])
        return found

    def _initialise(self, model, choice: InitChoice, tensors, meta):
        if choice.path is None:
            return {}
        load_into(model, tensors, choice.path)
        if choice.source != "checkpoint":
            return {}
        from pipeline.train.health import probe_images

        verdict = run_verdict(meta.get("run_id")) or run_verdict(model_version_run(choice.uri or ""))
        health_cfg = C.build(C.GateConfig, self.profile).health  # the gate's floors
        probe = to_device(probe_images(self.cfg.data, self.cfg.encoder.image_size,
                                       health_cfg.probe_size), self.world.device)
        return refuse_if_unfit(choice, model, meta, verdict, probe, health_cfg, self.force_init)

    def _build(self, resume_point):
        from pipeline.models.llm_loading import load_llm
        from pipeline.models.vision_bridge import VisionBridge

        if resume_point is not None:
            ckpt, meta = resume_point
            choice, tensors = InitChoice("resume", note=f"continuing the interrupted run "
                                                        f"{meta.get('run_id')} from {ckpt}"), None
        else:
            choice = choose_init(self.init, self.cfg.output_dir, self.cfg)
            choice = replace(choice, note=choice.note + self.not_resumed)
            raw, meta = load_checkpoint(choice.path) if choice.path else (None, {})
            tensors = model_tensors(raw) if raw is not None else None
            if tensors is not None:  # read once: the model's tensors and the LLM's adapters
                self.cfg = adopt_architecture(self.cfg, meta, tensors)
                self.init_adapters = initial_adapters(choice, raw, meta, self.cfg)
                if self.init_adapters:
                    choice = replace(choice, note=choice.note + ", with its LLM adapters")
        self.echo(f"init: {choice.source}: {choice.note}")
        llm = place(self.llm or load_llm(self.cfg.llm.name, self.cfg.llm.cache_dir,
                                         self.cfg.llm.dtype), self.world.device)
        if tensors is not None:  # before any run or step: weights of the wrong width never fit
            refuse_width_mismatch(choice, output_width(tensors), self.cfg.llm.name, llm.hidden_size)
        if self.init_adapters:  # adapters continue only on the base weights they were fitted to
            verify_base_llm(llm, meta, choice.path)
        seed_everything(self.cfg.seed)
        model = place(VisionBridge.from_config(self.cfg.encoder, self.cfg.bridge,
                                               out_dim=llm.hidden_size), self.world.device)
        health = self._initialise(model, choice, tensors, meta)
        return choice, llm, model, health

    def run(self) -> Stage2Result:
        """Train (or resume) one Stage 2 run; returns its result."""
        resume_point = self._resume_point()
        # Rank 0 first: it generates the data and converts the LLM into the shared caches.
        choice, llm, model, health = self.world.main_first(lambda: self._build(resume_point))
        records = self.world.main_first(lambda: load_dataset(self.cfg.data))
        loaders = EpochLoaders(records["train"], records["val"], self.cfg.encoder.image_size,
                               self.cfg.batch_size, self.cfg.seed, self.world,
                               self.cfg.data.num_workers)
        if not self.world.is_main:
            return self._run_rank(model, llm, loaders, resume_point)
        run_id = resume_point[1]["run_id"] if resume_point else None
        with stage_run("stage2", run_id=run_id) as run:
            self.run_id = run.info.run_id
            recipe = "findings" if self.cfg.findings else "plain-prefix"
            name_run(f"stage2 {recipe} lr={self.cfg.lr:g} init={choice.source} {self.profile}")
            self.out_dir = Path(self.cfg.output_dir) / self.run_id
            log = file_logger("stage2", self.out_dir / "stage2.log")
            if resume_point is not None:  # a resumed run keeps the init tags it was given
                set_run_tags({"resumed_from": f"{resume_point[0].name} (step "
                                              f"{resume_point[1]['step']})"})
            else:
                set_run_tags({"init.source": choice.source, "init.note": choice.note[:500],
                              **{f"init.health_{k}": f"{v:.4g}" for k, v in health.items()}})
                log_new_params({**C.flatten(self.cfg), "profile": self.profile, "init": self.init,
                                "batch_size_per_rank": self.cfg.batch_size,
                                "world_size": self.world.size,
                                "global_batch_size": loaders.global_batch_size,
                                **device_params(self.world.device),
                                "train_precision": train_precision(self.world.device,
                                                                   self.cfg.cpu_bf16)})
                log_dataset(records_frame(records), source=self.cfg.data.source,
                            name="stage2-data", digest=dataset_digest(records), context="training",
                            profile=dataset_profile(records))
            sink = MetricsSink(self.run_id, flush_every=10**9)
            trainer = Stage2Trainer(self.cfg, model, llm, loaders, self.out_dir, self.run_id,
                                    sink, sink.set_tags, log, flush=sink.flush, world=self.world,
                                    **({"label_fn": self.label_fn} if self.label_fn else {}))
            if resume_point is not None:
                resume_trainer(self.run_id, trainer, *resume_point, log)
            else:
                self._continue_adapters(trainer)
            sink(self._preflight(trainer), trainer.state.step)
            try:
                with sink.around_training():
                    result = trainer.fit()
            finally:
                self._log_outputs(trainer)
            self._record(trainer, result, llm, sink)
        return result

    def _run_rank(self, model, llm, loaders, resume_point) -> Stage2Result:
        """A rank other than 0: trains in step with rank 0; opens no run, writes nothing."""
        trainer = Stage2Trainer(self.cfg, model, llm, loaders, self.cfg.output_dir, "",
                                lambda m, s: None, lambda t: None, silent_logger("stage2.rank"),
                                world=self.world,
                                **({"label_fn": self.label_fn} if self.label_fn else {}))
        if resume_point is not None:
            trainer.restore(resume_point[0], resume_point[1]["resume"])
        else:
            self._continue_adapters(trainer)
        self._preflight(trainer)
        return trainer.fit()

    def _continue_adapters(self, trainer: Stage2Trainer) -> None:
        """The trainer gives the LLM fresh adapters; an initial Stage 2 checkpoint's go in
        over them (the same tensors the optimizer holds)."""
        if self.init_adapters:
            trainer.llm.load_adapter_state(self.init_adapters)

    def _preflight(self, trainer: Stage2Trainer) -> dict:
        return self.world.checked(trainer.preflight, (GuardError, TrainableLLMError))

    def _log_outputs(self, trainer: Stage2Trainer) -> None:
        import pandas as pd

        cfg_path = C.save_json(self.cfg, self.out_dir / "stage2_config.json")
        steps = []
        if trainer.csv_path.exists():
            frame = pd.read_csv(trainer.csv_path)
            per_epoch = max(1, trainer.loaders.batches_per_epoch)
            steps = list(zip(frame["step"] / per_epoch, frame["caption_loss"]))
        plot = plot_stage2(steps, trainer.epoch_history, list(self.cfg.bands),
                           self.out_dir / "stage2_loss.png", max_epoch=self.cfg.epochs)
        log_files([trainer.csv_path, plot, cfg_path, self.out_dir / "stage2.log"])
        log_files(sorted((self.out_dir / "val_reports").glob("*.json")), "val_reports")
        for name, path in trainer.result.checkpoints.items():
            if path.exists():
                set_run_tags({f"checkpoint.{name}.sha256": sha256_file(path)})
        log_files([p for p in trainer.result.checkpoints.values() if p.exists()], "checkpoints")

    def _record(self, trainer: Stage2Trainer, result: Stage2Result, llm,
                sink: MetricsSink) -> None:
        trainer.log_metrics({"final_train_loss": result.final_train_loss,
                             "best_val_loss": result.best_val_loss}, result.epochs_done)
        sink.drain()
        set_run_tags({"llm.checksum_before": result.llm_checksum_before,
                      "llm.checksum_after": result.llm_checksum_after,
                      "llm.name": self.cfg.llm.name})
        final = trainer.result.checkpoints[STAGE2_FINAL]
        version = register_report_model(final, self.run_id, self.cfg.llm.name, {
            "final_train_loss": f"{result.final_train_loss:.4f}",
            "first_step_loss": f"{result.first_step_loss:.4f}"})
        set_run_tags({"registry.report_vlm_version": version})
        self.echo(f"registered models:/report-vlm/{version} (alias candidate)")
