"""Stage 1: train vision + bridge without the LLM.

The loop knows nothing about MLflow: it reports through `log_metrics(metrics, step)` and
`set_tags(tags)` and writes checkpoints into `out_dir`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pipeline.stage1.augment import radiograph_views
from pipeline.checkpoint import save_checkpoint
from pipeline.config import COLLAPSE_TAG, Stage1Config, to_dict
from pipeline.guards import check_finite_loss, low_loss_warning
from pipeline.train.health import HEALTH_KEYS, feature_health, health_failures
from pipeline.stage1.objectives import OBJECTIVES, objective_loss
from pipeline.train.common import build_optimizer, optimizer_step

LogMetrics = Callable[[Mapping[str, float], int], None]
SetTags = Callable[[Mapping[str, str]], None]


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


class Stage1Trainer:
    """One Stage 1 training run over a model and data loaders."""

    def __init__(self, cfg: Stage1Config, model: torch.nn.Module, train_loader, val_loader,
                 probe_images: torch.Tensor, out_dir: str | Path, run_id: str,
                 log_metrics: LogMetrics, set_tags: SetTags, logger: logging.Logger,
                 profile: str | None = None):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {OBJECTIVES}")
        self.cfg, self.model = cfg, model
        self.train_loader, self.val_loader, self.probe_images = train_loader, val_loader, probe_images
        self.out_dir, self.run_id = Path(out_dir), run_id
        self.log_metrics, self.set_tags, self.log = log_metrics, set_tags, logger
        self.result = Stage1Result()
        self.profile = profile  # recorded in each checkpoint: the gate judges by its floors
        self.step = 0
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.pos_weight = None
        if cfg.objective == "findings":
            from pipeline.models.findings import positive_weights
            self.pos_weight = positive_weights(
                [r for batch in train_loader for r in batch["reports"]])

    def _save(self, kind: str, epoch: int, final_loss: float | None = None,
              interrupted: bool = False) -> Path:
        name = f"vision_bridge_step{self.step}" if kind == "step" else f"vision_bridge_{kind}"
        meta = _metadata(self.cfg, self.run_id, kind, self.step, epoch, final_loss,
                         self.result.health, self.profile)
        meta["interrupted"] = interrupted  # the save on interrupt, not a periodic one
        path = save_checkpoint(self.out_dir / "checkpoints" / name, self.model.state_dict(), meta)
        self.result.checkpoints[name] = path
        return path

    def _train_step(self, batch, optimizer, scheduler) -> float:
        loss, terms, _ = objective_loss(self.cfg.objective, self.model, batch["images"],
                                        radiograph_views, self.aug_gen, batch["reports"],
                                        self.pos_weight)
        value = check_finite_loss(loss, self.step + 1)
        grad_norm = optimizer_step(self.model, loss, optimizer, scheduler, self.cfg.grad_clip,
                                   self.step + 1)
        self.step += 1
        metrics = {"train_loss": value, "learning_rate": scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm}
        metrics.update({f"loss_{k}": float(v) for k, v in terms.items()})
        self.log_metrics(metrics, self.step)
        return value

    @torch.no_grad()
    def _validate(self) -> float:
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)  # same views every epoch
        # The findings objective is validated on the images as they are (no augmentation).
        augment = None if self.cfg.objective == "findings" else radiograph_views
        losses = [float(objective_loss(self.cfg.objective, self.model, batch["images"],
                                       augment, gen, batch["reports"], self.pos_weight)[0])
                  for batch in self.val_loader]
        if self.cfg.objective == "findings":
            self.result.val_scores = self._finding_scores()
        health = feature_health(self.model(self.probe_images))
        self.model.train()
        self.result.health = health
        return sum(losses) / max(1, len(losses))

    def _finding_scores(self) -> dict[str, float]:
        """Validation finding F1 of the head's decoded predictions (coarse and fine)."""
        from pipeline.models.findings import decode_findings, label_f1

        predicted, reports = [], []
        for batch in self.val_loader:
            predicted += decode_findings(self.model.findings(batch["images"]))
            reports += batch["reports"]
        return label_f1(reports, predicted, prefix="val_")

    def _end_epoch(self, epoch: int, losses: list[float]) -> None:
        epoch_loss = sum(losses) / max(1, len(losses))
        val_loss = self._validate()
        health = self.result.health
        self.log_metrics({"epoch_train_loss": epoch_loss, "val_loss": val_loss,
                          **{f"health_{k}": health[k] for k in HEALTH_KEYS},
                          **self.result.val_scores}, epoch)
        self.log.info("epoch %d: train_loss %.6g val_loss %.6g health %s", epoch, epoch_loss,
                      val_loss, {k: round(v, 4) for k, v in health.items()})
        self.result.final_train_loss, self.result.epochs_done = epoch_loss, epoch
        if val_loss < self.result.best_val_loss:
            self.result.best_val_loss = val_loss
            self._save("best_val", epoch)
        self._warn(epoch, epoch_loss, health)

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
        """Train for cfg.epochs; on interrupt save `vision_bridge_step{N}` and re-raise."""
        cfg = self.cfg
        total = cfg.epochs * len(self.train_loader)
        optimizer, scheduler = build_optimizer(self.model, cfg.lr, cfg.weight_decay, total,
                                               cfg.warmup_steps)
        self.model.train()
        bar = tqdm(total=total, desc=f"stage1 {cfg.objective}", unit="step", dynamic_ncols=True)
        try:
            for epoch in range(1, cfg.epochs + 1):
                losses = []
                for batch in self.train_loader:
                    losses.append(self._train_step(batch, optimizer, scheduler))
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4g}")
                    if self.step % cfg.checkpoint_every == 0:
                        self._save("step", epoch)
                self._end_epoch(epoch, losses)
        except KeyboardInterrupt:
            self.log.warning("interrupted at step %d: saving the last checkpoint", self.step)
            self._save("step", self.result.epochs_done, interrupted=True)
            raise
        finally:
            bar.close()
            self.result.steps_done = self.step
        self._save("final", self.result.epochs_done, self.result.final_train_loss)
        return self.result


@dataclass
class Stage1Inputs:
    """Model, loaders and probe batch for a Stage 1 run, built from its config."""

    model: torch.nn.Module
    records: dict
    train_loader: object
    val_loader: object
    probe_images: torch.Tensor


def build_stage1_inputs(cfg: Stage1Config) -> Stage1Inputs:
    """Load (or generate) the data and build the vision-bridge model for `cfg`."""
    from pipeline.data import image_batch, load_dataset
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.train.common import make_loader, seed_everything

    gen = seed_everything(cfg.seed)
    records = load_dataset(cfg.data)
    if not records["val"]:
        raise ValueError(f"data {cfg.data.source!r} has an empty val split; Stage 1 needs it "
                         "for val_loss and the feature-health probe")
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    size = cfg.encoder.image_size
    train_loader = make_loader(records["train"], size, cfg.batch_size, shuffle=True, generator=gen)
    val_loader = make_loader(records["val"], size, cfg.batch_size, shuffle=False)
    probe_images = image_batch(records["val"][:cfg.health.probe_size], size)
    return Stage1Inputs(model, records, train_loader, val_loader, probe_images)
