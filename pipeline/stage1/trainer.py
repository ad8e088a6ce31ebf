"""Stage 1: train vision + bridge without the LLM.

The loop knows nothing about MLflow: it reports through `log_metrics(metrics, step)` and
`set_tags(tags)` and writes checkpoints into `out_dir`.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pipeline import interrupts
from pipeline.checkpoint import save_checkpoint
from pipeline.config import COLLAPSE_TAG, Stage1Config, to_dict
from pipeline.device import autocast, full_precision, to_device
from pipeline.data import DataError
from pipeline.guards import GuardError, check_finite_loss, low_loss_warning
from pipeline.models.loading import load_into, model_tensors
from pipeline.stage1.augment import per_sample, radiograph_views
from pipeline.stage1.objectives import OBJECTIVES, objective_loss
from pipeline.train.common import EpochLoaders, build_optimizer, optimizer_step
from pipeline.train.distributed import SINGLE, World
from pipeline.train.health import HEALTH_KEYS, feature_health, health_failures
from pipeline.train.resume import (ResumeState, append_csv_row, optimizer_tensors,
                                   restore_optimizer, state_from_metadata, truncate_csv)

LogMetrics = Callable[[Mapping[str, float], int], None]
SetTags = Callable[[Mapping[str, str]], None]
STEP_STEM = "vision_bridge_step"


def step_metrics(row: Mapping[str, str]) -> dict[str, float]:
    """The per-step MLflow metrics of one CSV row (every column but step, epoch, seconds)."""
    return {k: float(v) for k, v in row.items() if k not in ("step", "epoch", "seconds") and v}


@dataclass
class Stage1Result:
    """What a finished (or interrupted) Stage 1 run produced."""

    final_train_loss: float = float("nan")
    best_val_loss: float = float("inf")
    epochs_done: int = 0
    steps_done: int = 0
    health: dict = field(default_factory=dict)
    val_scores: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    checkpoints: dict = field(default_factory=dict)  # kind -> Path


def _metadata(cfg: Stage1Config, run_id: str, kind: str, step: int, epoch: int,
              final_loss: float | None, health: Mapping[str, float],
              profile: str | None = None) -> dict:
    return {"stage": "stage1", "run_id": run_id, "kind": kind, "objective": cfg.objective,
            **({"profile": profile} if profile else {}),
            "lr": cfg.lr, "final_loss": final_loss, "step": step, "epoch": epoch,
            "health": dict(health), "config": json.dumps(to_dict(cfg), sort_keys=True),
            "format_version": 1}


class _ObjectiveStep(torch.nn.Module):
    """The objective's loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, objective: str, pos_weight):
        super().__init__()
        self.model, self.objective, self.pos_weight = model, objective, pos_weight

    def forward(self, images: torch.Tensor, reports, generators):
        loss, terms, _ = objective_loss(self.objective, self.model, images,
                                        per_sample(radiograph_views), generators, reports,
                                        self.pos_weight)
        return loss, terms


class Stage1Trainer:
    """One Stage 1 training run (fresh or resumed from a step checkpoint) on one rank."""

    def __init__(self, cfg: Stage1Config, model: torch.nn.Module, loaders: EpochLoaders,
                 probe_images: torch.Tensor, out_dir: str | Path, run_id: str,
                 log_metrics: LogMetrics, set_tags: SetTags, logger: logging.Logger,
                 profile: str | None = None, flush: Callable[[], None] = lambda: None,
                 world: World = SINGLE):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {OBJECTIVES}")
        self.cfg, self.model, self.loaders, self.probe_images = cfg, model, loaders, probe_images
        self.out_dir, self.run_id = Path(out_dir), run_id
        self.log_metrics, self.set_tags, self.log, self.flush = log_metrics, set_tags, logger, flush
        self.world = world
        self.result = Stage1Result()
        self.profile = profile  # recorded in each checkpoint: the gate judges by its floors
        self.state = ResumeState()
        self.csv_path = self.out_dir / "stage1_train_log.csv"
        self.epoch_history: dict[str, list] = {}  # per-epoch metric -> [(epoch, value)]
        self.pos_weight = None
        if cfg.objective == "findings":
            from pipeline.models.findings import positive_weights
            self.pos_weight = positive_weights([r.report for r in loaders.train.records])
        self.optimizer, self.scheduler = build_optimizer(
            model, cfg.lr, cfg.weight_decay, cfg.epochs * loaders.batches_per_epoch,
            cfg.warmup_steps)
        self.step_model = world.wrap(_ObjectiveStep(model, cfg.objective, self.pos_weight))

    @property
    def step(self) -> int:
        return self.state.step

    # ---- checkpoints -----------------------------------------------------------------------
    def _save(self, kind: str, final_loss: float | None = None,
              interrupted: bool = False) -> Path | None:
        """Write a checkpoint (rank 0 only); step checkpoints carry the resume state."""
        if not self.world.is_main:
            return None
        name = f"{STEP_STEM}{self.step}" if kind == "step" else f"vision_bridge_{kind}"
        epoch = self.state.epoch if kind == "step" else self.result.epochs_done
        meta = _metadata(self.cfg, self.run_id, kind, self.step, epoch, final_loss,
                         self.result.health, self.profile)
        meta["interrupted"] = interrupted  # the save on interrupt, not a periodic one
        tensors = self.model.state_dict()
        if kind == "step":
            tensors = {f"model.{k}": v for k, v in tensors.items()} | optimizer_tensors(self.optimizer)
            meta.update(self.state.to_metadata(
                self.optimizer, self.scheduler, best_val_loss=self.result.best_val_loss,
                final_train_loss=self.result.final_train_loss,
                epochs_done=self.result.epochs_done, val_scores=self.result.val_scores,
                epoch_history=self.epoch_history, world_size=self.world.size))
        path = save_checkpoint(self.out_dir / "checkpoints" / name, tensors, meta)
        self.result.checkpoints[name] = path
        return path

    def restore(self, tensors: Mapping[str, torch.Tensor], resume: Mapping) -> int:
        """Continue from a step checkpoint's tensors and resume block; returns CSV rows kept."""
        load_into(self.model, model_tensors(dict(tensors)), "the resume checkpoint")
        restore_optimizer(self.optimizer, self.scheduler, tensors, resume)
        self.state = state_from_metadata(resume)
        self.result.best_val_loss = resume["best_val_loss"]
        self.result.final_train_loss = resume["final_train_loss"]
        self.result.epochs_done = resume["epochs_done"]
        self.result.val_scores = dict(resume["val_scores"])
        self.epoch_history = {k: [tuple(x) for x in v] for k, v in resume["epoch_history"].items()}
        return truncate_csv(self.csv_path, self.step) if self.world.is_main else 0

    def history(self) -> dict[str, list]:
        """Every step's train_loss (from the CSV, so a resumed run's earlier steps too) and
        every epoch's metrics, for the curves plot."""
        steps = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                steps = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(handle)]
        return {"train_loss": steps, **self.epoch_history}

    def _between_steps(self) -> bool:
        """Whether the weights are those of `self.step`: no optimizer update is half done."""
        done = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(done, default=self.step) == self.step

    def _checkpoint(self, interrupted: bool = False) -> None:
        # Metrics are sent only right after a step checkpoint: after a kill, MLflow never
        # holds a step the resumed run will log again.
        self.state.seconds = time.monotonic() - self._t0
        self._save("step", interrupted=interrupted)
        self.flush()

    # ---- one step --------------------------------------------------------------------------
    def _generators(self, positions) -> list[torch.Generator]:
        """One augmentation generator per sample, from (seed, step, place in the global
        batch): a sample's view does not depend on its rank, its batch-mates or a resume."""
        base = (self.cfg.seed * 1_000_003 + self.step) * 100_003
        return [torch.Generator().manual_seed(base + p) for p in positions]

    def _step(self, batch, epoch: int) -> float:
        with autocast(self.world.device):
            loss, terms = self.step_model(to_device(batch["images"], self.world.device),
                                          batch["reports"], self._generators(batch["positions"]))
        error, local = None, float("nan")
        try:
            local = check_finite_loss(loss, self.step + 1)
        except GuardError as exc:
            error = exc
        count = len(batch["reports"]) if batch["weight"] else 0
        ((value, _),) = self.world.mean([(local, count)], error)
        grad_norm = optimizer_step(self.model, loss * batch["weight"], self.optimizer,
                                   self.scheduler, self.cfg.grad_clip, self.step + 1)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.state.epoch_losses.append(value)
        metrics = {"train_loss": value, "learning_rate": self.scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm, **{f"loss_{k}": float(v) for k, v in terms.items()}}
        self.log_metrics(metrics, self.step)
        if self.world.is_main:
            append_csv_row(self.csv_path, ["step", "epoch", *metrics, "seconds"],
                           {"step": self.step, "epoch": epoch, **metrics,
                            "seconds": round(time.monotonic() - self._t0, 3)})
        return value

    # ---- epochs ----------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self) -> float:
        with full_precision(self.world.device):
            return self._validate_fp32()

    def _validate_fp32(self) -> float:
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)  # same views every epoch
        # The findings objective is validated on the images as they are (no augmentation).
        augment = None if self.cfg.objective == "findings" else radiograph_views
        losses = [float(objective_loss(self.cfg.objective, self.model,
                                       to_device(batch["images"], self.world.device),
                                       augment, gen, batch["reports"], self.pos_weight)[0])
                  for batch in self.loaders.val()]
        if self.cfg.objective == "findings":
            self.result.val_scores = self._finding_scores()
        health = feature_health(self.model(self.probe_images))
        self.model.train()
        self.result.health = health
        return sum(losses) / max(1, len(losses))

    def _finding_scores(self) -> dict[str, float]:
        """Validation finding F1 of the head's decoded predictions (coarse and fine)."""
        from pipeline.data.finding_metrics import label_f1
        from pipeline.models.findings import decode_findings

        predicted, reports = [], []
        for batch in self.loaders.val():
            predicted += decode_findings(self.model.findings(to_device(batch["images"],
                                                                       self.world.device)))
            reports += batch["reports"]
        return label_f1(reports, predicted, prefix="val_")

    def _end_epoch(self, epoch: int, losses: list[float]) -> None:
        """Validate on rank 0, keep the best weights, warn; then log and move the counters to
        the next epoch together (a failure before leaves the epoch to be ended again)."""
        epoch_loss = sum(losses) / max(1, len(losses))
        self.result.final_train_loss, self.result.epochs_done = epoch_loss, epoch
        if self.world.is_main:
            val_loss = self._validate()
            health = self.result.health
            if val_loss < self.result.best_val_loss:
                self.result.best_val_loss = val_loss
                self._save("best_val")
            self._warn(epoch, epoch_loss, health)
            metrics = {"epoch_train_loss": epoch_loss, "val_loss": val_loss,
                       **{f"health_{k}": health[k] for k in HEALTH_KEYS}, **self.result.val_scores}
            self.log.info("epoch %d: train_loss %.6g val_loss %.6g health %s", epoch, epoch_loss,
                          val_loss, {k: round(v, 4) for k, v in health.items()})
            self.log_metrics(metrics, epoch)
            for key, value in metrics.items():
                self.epoch_history.setdefault(key, []).append((epoch, value))
        self.state.epoch, self.state.batch_in_epoch, self.state.epoch_losses = epoch + 1, 0, []

    def _warn(self, epoch: int, epoch_loss: float, health: Mapping[str, float]) -> None:
        messages = [m for m in [low_loss_warning(epoch_loss, epoch)] if m]
        reasons = health_failures(health, self.cfg.health)
        if reasons:
            messages.append(f"WARNING: feature health collapsed at epoch {epoch} "
                            f"({'; '.join(reasons)}). Do not initialise Stage 2 from this run; "
                            "use --from_scratch.")
        for message in messages:
            self.log.warning(message)
            self.result.warnings.append(message)
        if messages:
            self.set_tags({COLLAPSE_TAG: "true", "health.warning": " | ".join(messages)[:500]})

    def fit(self) -> Stage1Result:
        """Train to cfg.epochs (continuing from `self.state` when resumed); when stopped
        (interrupt, guard, a lost rank) save `vision_bridge_step{N}` with the resume state and
        re-raise."""
        cfg = self.cfg
        self._t0 = time.monotonic() - self.state.seconds
        self.model.train()
        bar = tqdm(total=cfg.epochs * self.loaders.batches_per_epoch, initial=self.step,
                   desc=f"stage1 {cfg.objective}", unit="step", dynamic_ncols=True,
                   disable=not self.world.is_main)
        try:
            for epoch in range(self.state.epoch, cfg.epochs + 1):
                self.state.epoch = epoch
                for batch in self.loaders.epoch(epoch, self.state.batch_in_epoch):
                    with interrupts.atomic():  # a stop signal waits for the step to end
                        loss = self._step(batch, epoch)
                        if self.step % cfg.checkpoint_every == 0:
                            self._checkpoint()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
                with interrupts.atomic():
                    self._end_epoch(epoch, self.state.epoch_losses)
                self.world.barrier()  # the other ranks wait while rank 0 validates
        except BaseException as exc:  # interrupted, a guard, a lost rank: save where it stands
            if self._between_steps():
                self.log.warning("%s at step %d: saving the last checkpoint",
                                 "interrupted" if isinstance(exc, KeyboardInterrupt)
                                 else type(exc).__name__, self.step)
                self._checkpoint(interrupted=True)
            raise
        finally:
            bar.close()
            self.result.steps_done = self.step
        self.state.epoch = cfg.epochs
        self._save("final", self.result.final_train_loss)
        return self.result


@dataclass
class Stage1Inputs:
    """Model, loaders and probe batch for a Stage 1 run, built from its config."""

    model: torch.nn.Module
    records: dict
    loaders: EpochLoaders
    probe_images: torch.Tensor


def build_stage1_inputs(cfg: Stage1Config, world: World = SINGLE) -> Stage1Inputs:
    """Load (or generate) the data and build the vision-bridge model for `cfg`.

    `cfg.batch_size` is per rank: the global batch is `cfg.batch_size * world.size`.
    """
    from pipeline.data import image_batch, load_dataset
    from pipeline.device import place
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.train.common import seed_everything

    seed_everything(cfg.seed)
    records = world.main_first(lambda: load_dataset(cfg.data))
    if not records["val"]:
        raise DataError(f"data {cfg.data.source!r} has an empty val split; Stage 1 needs it "
                         "for val_loss and the feature-health probe")
    model = place(VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim),
                  world.device)
    size = cfg.encoder.image_size
    loaders = EpochLoaders(records["train"], records["val"], size, cfg.batch_size, cfg.seed, world,
                           cfg.data.num_workers)
    probe_images = to_device(image_batch(records["val"][:cfg.health.probe_size], size),
                             world.device)
    return Stage1Inputs(model, records, loaders, probe_images)
