"""Stage 1: train vision + bridge without the LLM.

The loop (`pipeline.train.loop.TrainLoop`) knows nothing about MLflow: it reports through
`log_metrics(metrics, step)` and `set_tags(tags)` and writes checkpoints into `out_dir`.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from pipeline.config import COLLAPSE_TAG, Stage1Config
from pipeline.device import autocast, full_precision, host_values, to_device
from pipeline.data import DataError
from pipeline.guards import GuardError, check_finite_loss, low_loss_warning
from pipeline.models.loading import load_into, model_tensors
from pipeline.stage1.augment import per_sample, radiograph_views
from pipeline.stage1.objectives import OBJECTIVES, objective_loss
from pipeline.train.common import EpochLoaders, build_optimizer, optimizer_step
from pipeline.train.distributed import SINGLE, World
from pipeline.train.health import HEALTH_KEYS, feature_health, health_failures
from pipeline.train.loop import LogMetrics, SetTags, TrainLoop

STEP_STEM = "vision_bridge_step"


def step_metrics(row: Mapping) -> dict[str, float]:
    """The per-step MLflow metrics of one CSV row (every column but step, epoch, seconds)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "epoch", "seconds") and v not in ("", None)}


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


class _ObjectiveStep(torch.nn.Module):
    """The objective's loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: torch.nn.Module, objective: str, pos_weight,
                 uncertain: str = "positive"):
        super().__init__()
        self.model, self.objective, self.pos_weight = model, objective, pos_weight
        self.uncertain = uncertain

    def forward(self, images: torch.Tensor, reports, generators):
        loss, terms, _ = objective_loss(self.objective, self.model, images,
                                        per_sample(radiograph_views), generators, reports,
                                        self.pos_weight, self.uncertain)
        return loss, terms


class Stage1Trainer(TrainLoop):
    """One Stage 1 training run (fresh or resumed from a step checkpoint) on one rank."""

    name, step_stem, final_stem = "stage1", STEP_STEM, "vision_bridge"

    def __init__(self, cfg: Stage1Config, model: torch.nn.Module, loaders: EpochLoaders,
                 probe_images: torch.Tensor, out_dir: str | Path, run_id: str,
                 log_metrics: LogMetrics, set_tags: SetTags, logger: logging.Logger,
                 profile: str | None = None, flush: Callable[[], None] = lambda: None,
                 world: World = SINGLE):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {OBJECTIVES}")
        super().__init__(cfg, loaders, out_dir, run_id, log_metrics, set_tags, logger, flush,
                         world)
        self.model, self.probe_images = model, probe_images
        self.result = Stage1Result()
        self.profile = profile  # recorded in each checkpoint: the gate judges by its floors
        self.pos_weight = None
        if cfg.objective == "findings":
            from pipeline.models.findings import positive_weights
            self.pos_weight = positive_weights([r.report for r in loaders.train.records],
                                               uncertain=cfg.data.uncertain)
            if model.finding_head is None:
                raise ValueError("objective 'findings' needs the finding head "
                                 "(bridge.finding_head=true)")
            model.finding_head.set_prior(self.pos_weight)
        self.optimizer, self.scheduler = build_optimizer(
            model, cfg.lr, cfg.weight_decay, cfg.epochs * loaders.batches_per_epoch,
            cfg.warmup_steps)
        # placed once: the finding loss would otherwise copy it to the device every step
        step_weight = to_device(self.pos_weight, world.device)
        self.step_model = world.wrap(_ObjectiveStep(model, cfg.objective, step_weight,
                                                    cfg.data.uncertain))

    # ---- checkpoints -----------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {"objective": self.cfg.objective,
                **({"profile": self.profile} if self.profile else {}),
                "health": dict(self.result.health)}

    def _weights(self, kind: str) -> dict[str, torch.Tensor]:
        return super()._weights(kind) if kind == "step" else self.model.state_dict()

    def _load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_into(self.model, model_tensors(dict(tensors)), "the resume checkpoint")

    def _resume_extras(self) -> dict:
        return {"val_scores": self.result.val_scores}

    def _restore_extras(self, resume: Mapping) -> None:
        self.result.val_scores = dict(resume["val_scores"])

    def history(self) -> dict[str, list]:
        """Every step's train_loss (from the CSV, so a resumed run's earlier steps too) and
        every epoch's metrics, for the curves plot."""
        steps = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                steps = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(handle)]
        return {"train_loss": steps, **self.epoch_history}

    # ---- one step --------------------------------------------------------------------------
    def _generators(self, positions) -> list[torch.Generator]:
        """One augmentation generator per sample, from (seed, step, place in the global
        batch): a sample's view does not depend on its rank, its batch-mates or a resume."""
        base = (self.cfg.seed * 1_000_003 + self.step) * 100_003
        return [torch.Generator().manual_seed(base + p) for p in positions]

    def _train_step(self, batch) -> tuple[float, dict]:
        with autocast(self.world.device):
            loss, terms = self.step_model(to_device(batch["images"], self.world.device),
                                          batch["reports"], self._generators(batch["positions"]))
        # The loss and the objective's terms for the log: one read of the device
        read, *term_values = host_values(loss, *terms.values())
        error, local = None, float("nan")
        try:
            local = check_finite_loss(read, self.step + 1)
        except GuardError as exc:
            error = exc
        count = len(batch["reports"]) if batch["weight"] else 0
        ((value, _),) = self.world.mean([(local, count)], error)
        grad_norm = optimizer_step(self.model, loss * batch["weight"], self.optimizer,
                                   self.scheduler, self.cfg.grad_clip, self.step + 1)
        return value, {"train_loss": value, "learning_rate": self.scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm,
                       **{f"loss_{k}": v for k, v in zip(terms, term_values)}}

    def step_metrics(self, row: Mapping) -> dict[str, float]:
        return step_metrics(row)

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

        predicted, reports = [], []
        for batch in self.loaders.val():
            images = to_device(batch["images"], self.world.device)
            predicted += self.model.decode_findings(self.model.findings(images))
            reports += batch["reports"]
        return label_f1(reports, predicted, prefix="val_")

    def _end_epoch(self, epoch: int, train_loss: float) -> float | None:
        """Validate on rank 0 (loss, finding F1, feature health), warn, log."""
        if not self.world.is_main:
            return None
        val_loss = self._validate()
        health = self.result.health
        self._warn(epoch, train_loss, health)
        metrics = {"epoch_train_loss": train_loss, "val_loss": val_loss,
                   **{f"health_{k}": health[k] for k in HEALTH_KEYS}, **self.result.val_scores}
        self.log.info("epoch %d: train_loss %.6g val_loss %.6g health %s", epoch, train_loss,
                      val_loss, {k: round(v, 4) for k, v in health.items()})
        self.log_metrics(metrics, epoch)
        for key, value in metrics.items():
            self.epoch_history.setdefault(key, []).append((epoch, value))
        return val_loss

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

    def _description(self) -> str:
        return f"stage1 {self.cfg.objective}"

    def fit(self) -> Stage1Result:
        try:
            return super().fit()
        finally:
            self.result.steps_done = self.step


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
