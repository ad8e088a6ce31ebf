"""Stage 2: train vision + bridge against the frozen LLM with caption cross-entropy.

Guards, in order: before the first step the LLM is frozen and none of its parameters is in
the optimizer, and the first batches' labels supervise exactly the report + EOS positions;
after the first step a loss under 0.1 warns about label masking; every epoch the curve is
judged against healthy bands; after training the LLM's checksum must equal the one before.
The loop reports through `log_metrics` / `set_tags` and writes files into `out_dir`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pipeline import interrupts
from pipeline.models import captioning
from pipeline.checkpoint import save_checkpoint
from pipeline.config import Stage2Config, to_dict
from pipeline.device import autocast, full_precision, to_device
from pipeline.data.finding_metrics import label_f1
from pipeline.models.findings import finding_loss, positive_weights
from pipeline.models.report_model import (caption_forward, generate_reports,
                                          report_token_limit, uses_findings)
from pipeline.train.curve import degenerate, distinct_share, judge_epoch
from pipeline.guards import (IGNORE_INDEX, GuardError, check_finite_loss,
                             check_label_mask, check_optimizer_excludes)
from pipeline.data.report_text import ReportStyle, language_scores
from pipeline.models.bridge import check_visual_tokens
from pipeline.models.llm import ADAPTER_PREFIX, prepare_adapters
from pipeline.stage2.resume import ResumeState, append_csv_row, optimizer_tensors, resume_extras
from pipeline.train.common import build_optimizer, optimizer_step
from pipeline.train.distributed import SINGLE, World
from pipeline.train.split_pass import split_findings, split_grounding_losses

STYLE_SENTENCES = 5000  # training sentences a checkpoint carries for candidate choice
CSV_FIELDS = ("step", "epoch", "caption_loss", "finding_loss", "lr", "grad_norm", "seconds")
IMAGE_IGNORED_TAG = "stage2.image_ignored"
LOW_FIRST_STEP = ("WARNING: first-step caption loss {loss:.4f} < 0.1. A healthy run starts "
                  "around 3-5; this almost always means label masking is broken (visual, "
                  "prompt or padding positions supervised).")


def step_metrics(row: Mapping[str, str], findings: bool) -> dict[str, float]:
    """The per-step MLflow metrics of one CSV row."""
    metrics = {"train_loss": float(row["caption_loss"]), "learning_rate": float(row["lr"]),
               "grad_norm": float(row["grad_norm"])}
    if findings:
        metrics["train_finding_loss"] = float(row["finding_loss"])
    return metrics


@dataclass
class Stage2Result:
    """What a Stage 2 run produced."""

    first_step_loss: float | None = None
    final_train_loss: float = float("nan")
    best_val_loss: float = float("inf")
    epochs_done: int = 0
    verdicts: dict = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)
    llm_checksum_before: str = ""
    llm_checksum_after: str = ""
    val_reports: list = field(default_factory=list)
    image_ignored: bool = False


class _CaptionStep(torch.nn.Module):
    """A batch's losses as the vision-bridge's forward, so that DistributedDataParallel wraps
    the vision-bridge alone: the frozen LLM is no submodule, it stays whole on every rank.
    Its LoRA adapters (when it has them) are registered here too, the same tensors, so that
    DDP averages their gradients and the optimizer, clipping and finite-gradient guard see
    exactly what trains."""

    def __init__(self, model: torch.nn.Module, batch_losses: Callable, adapters=()):
        super().__init__()
        self.model, self.batch_losses = model, batch_losses
        self.adapters = torch.nn.ParameterList(list(adapters))

    def forward(self, batch, check: bool):
        return self.batch_losses(batch, check=check)


class Stage2Trainer:
    """One Stage 2 run (fresh or resumed from a step checkpoint) on one rank."""

    def __init__(self, cfg: Stage2Config, model, llm, loaders, out_dir: str | Path, run_id: str,
                 log_metrics: Callable, set_tags: Callable, logger: logging.Logger,
                 label_fn: Callable = captioning.make_labels, flush: Callable = lambda: None,
                 world: World = SINGLE):
        self.cfg, self.model, self.llm, self.loaders, self.world = cfg, model, llm, loaders, world
        self.out_dir, self.run_id = Path(out_dir), run_id
        self.log_metrics, self.set_tags, self.log, self.flush = log_metrics, set_tags, logger, flush
        self.label_fn = label_fn
        self.result = Stage2Result()
        self.state = ResumeState()
        self.csv_path = self.out_dir / "stage2_train_log.csv"
        self.epoch_history: dict[str, list] = {"epoch_train_loss": [], "val_loss": [],
                                               "val_grounding_gap": []}
        self.findings = uses_findings(cfg, model)
        self.aux_findings = self.findings and cfg.aux_finding_weight > 0
        self.pos_weight = positive_weights([r.report for r in loaders.train.records]) \
            if self.findings else None
        # The training reports' style: report form of the validation reports, candidate choice
        # after training (saved with every checkpoint, the most frequent sentences first).
        self.style = ReportStyle.from_reports(r.report for r in loaders.train.records)
        # Generation stops within the references' lengths: the longest of (up to 2,000)
        # training reports in tokens, plus EOS and a little room.
        self.report_token_limit = report_token_limit(llm.tokenizer, [
            r.report for r in loaders.train.records[:2000]])
        # Fresh adapters (or none: the LLM as it was loaded) for every new run; a resumed run
        # then loads the saved ones over them.
        prepare_adapters(llm, cfg.llm)
        self.adapters = [p for _, p in llm.named_adapter_parameters()]
        self.trained = _CaptionStep(model, self._batch, self.adapters)
        self.optimizer, self.scheduler = build_optimizer(
            self.trained, cfg.lr, cfg.weight_decay, cfg.epochs * loaders.batches_per_epoch,
            cfg.warmup_steps, groups=self._param_groups())
        self.step_model = world.wrap(self.trained)

    def _param_groups(self):
        """Bridge at `lr`, encoder (+ finding head) at `encoder_lr` (LLaVA: projector fast),
        the LLM's adapters at `adapter_lr`."""
        encoder_lr = self.cfg.lr if self.cfg.encoder_lr is None else self.cfg.encoder_lr
        if encoder_lr == self.cfg.lr and not self.adapters:
            return None
        slow = [p for name, p in self.model.named_parameters() if not name.startswith("bridge.")]
        groups = [(list(self.model.bridge.parameters()), self.cfg.lr), (slow, encoder_lr)]
        return groups + ([(self.adapters, self.cfg.adapter_lr)] if self.adapters else [])

    # ---- one batch -------------------------------------------------------------------------
    def _teacher_labels(self, reports):
        """True findings for the training prompt, with probability cfg.teacher_forcing."""
        if not self.findings:
            return None
        draw = torch.rand((), generator=torch.Generator().manual_seed(
            self.cfg.seed * 100_003 + self.state.step)).item()
        if draw >= self.cfg.teacher_forcing:
            return None
        from pipeline.data.labeler import label_report
        return [label_report(r) for r in reports]

    def _check(self, out) -> int:
        """The structural guards on one batch's visual tokens and labels."""
        check_visual_tokens(out.visual, self.model.num_visual_tokens,
                            self.cfg.bridge.max_visual_tokens)
        return check_label_mask(out.labels, captioning.report_positions(out.layout))

    def _batch(self, batch, check: bool = False, teacher: bool = True):
        true_labels = self._teacher_labels(batch["reports"]) if teacher else None
        out = caption_forward(self.model, self.llm, to_device(batch["images"], self.world.device),
                              batch["reports"], self.cfg, true_labels, self.label_fn)
        if check:
            self._check(out)
        aux = None
        if self.aux_findings:
            aux = finding_loss(out.logits, batch["reports"], self.pos_weight)
        # The caption loss is a mean over supervised tokens (the LM shifts labels by one).
        tokens = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
        return out.loss, aux, out.layout, tokens

    def preflight(self, n_batches: int = 2) -> dict:
        """Frozen LLM, optimizer scope and label layout, before any step; returns statistics."""
        self.llm.assert_frozen()
        n_params = check_optimizer_excludes(self.optimizer, self.llm.named_base_parameters())
        supervised = 0
        with torch.no_grad():
            for i, batch in enumerate(self.loaders.epoch(1, 0)):
                if i >= n_batches:
                    break
                out = caption_forward(self.model, self.llm,
                                      to_device(batch["images"], self.world.device),
                                      batch["reports"], self.cfg,
                                      self._teacher_labels(batch["reports"]), self.label_fn)
                supervised += self._check(out)
        return {"preflight_supervised_tokens": supervised, "optimizer_tensors": n_params,
                "llm_adapter_parameters": float(sum(p.numel() for p in self.adapters))}

    def _step(self, batch, epoch: int) -> float:
        error, value, aux_value, tokens = None, float("nan"), 0.0, 0
        try:  # a guard firing on any rank stops every rank (World.mean)
            with autocast(self.world.device):  # bf16 LLM forward (and so backward) on CUDA
                loss, aux, layout, tokens = self.step_model(batch, self.state.step == 0)
            value = check_finite_loss(loss, self.state.step + 1)
            aux_value = check_finite_loss(aux, self.state.step + 1) if aux is not None else 0.0
        except GuardError as exc:
            error = exc
        samples = len(batch["reports"]) if batch["weight"] else 0
        tokens = tokens if batch["weight"] else 0
        (value, all_tokens), (aux_value, all_samples) = self.world.mean(
            [(value, tokens), (aux_value, samples)], error)
        # Each rank's share of the global means (1 in one process): the ranks' averaged
        # gradients are then those of the global batch's token- and sample-means.
        size = self.world.size
        total = loss * (tokens * size / max(1, all_tokens))
        if aux is not None:
            total = total + self.cfg.aux_finding_weight * aux * (samples * size / max(1, all_samples))
        grad_norm = optimizer_step(self.trained, total, self.optimizer, self.scheduler,
                                   self.cfg.grad_clip, self.state.step + 1)
        self.state.step += 1
        if self.result.first_step_loss is None and self.state.step == 1:
            self.result.first_step_loss = value
            self.log_metrics({"first_step_loss": value}, 1)
            if value < self.cfg.low_loss:
                self.log.warning(LOW_FIRST_STEP.format(loss=value))
                self.set_tags({"stage2.first_step_warning": "loss<0.1: check label masking"})
        lr = self.scheduler.get_last_lr()[0]
        row = {"step": self.state.step, "epoch": epoch, "caption_loss": f"{value:.6f}",
               "finding_loss": f"{aux_value:.6f}", "lr": f"{lr:.6g}",
               "grad_norm": f"{grad_norm:.4f}", "seconds": f"{time.monotonic() - self._t0:.2f}"}
        self._csv_row(row)
        # Logged as the CSV holds them, so a resumed run re-sends exactly the same values.
        self.log_metrics(step_metrics(row, self.aux_findings), self.state.step)
        if layout.truncated:
            self.log_metrics({"truncated_reports": layout.truncated}, self.state.step)
        return value

    # ---- files -----------------------------------------------------------------------------
    def _csv_row(self, row: Mapping) -> None:
        if self.world.is_main:
            append_csv_row(self.csv_path, CSV_FIELDS, row)

    def _metadata(self, kind: str, final_loss=None) -> dict:
        return {"stage": "stage2", "run_id": self.run_id, "kind": kind, "lr": self.cfg.lr,
                "final_loss": final_loss, "step": self.state.step, "epoch": self.state.epoch,
                "llm": self.cfg.llm.name, "hidden_size": self.llm.hidden_size,
                "config": json.dumps(to_dict(self.cfg), sort_keys=True), "format_version": 1,
                "report_style": json.dumps(self.style.to_sentences()[:STYLE_SENTENCES]),
                "report_token_limit": self.report_token_limit}

    def save(self, kind: str, final_loss=None, interrupted: bool = False) -> Path | None:
        """Write a checkpoint (rank 0 only); step checkpoints carry optimizer/scheduler state
        for resume."""
        if not self.world.is_main:
            return None
        name = f"vision_bridge_vlm_{kind}"
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"{ADAPTER_PREFIX}.{k}": v for k, v in self.llm.adapter_state().items()})
        meta = self._metadata(kind, final_loss)
        meta["interrupted"] = interrupted  # the save on interrupt, not a periodic one
        if kind == "step":
            name = f"vision_bridge_vlm_step{self.state.step}"
            tensors.update(optimizer_tensors(self.optimizer))
            meta.update(self.state.to_metadata(self.optimizer, self.scheduler,
                                               **resume_extras(self.result, self.epoch_history, self.world.size)))
        path = save_checkpoint(self.out_dir / "checkpoints" / name, tensors, meta)
        self.result.checkpoints[name] = path
        if kind == "step":
            self._prune_step_checkpoints(keep=2)
        return path

    def _prune_step_checkpoints(self, keep: int) -> None:
        # Each step checkpoint holds optimizer state (3x the weights); the last two suffice.
        steps = sorted(self.result.checkpoints, key=lambda n: int(n.rsplit("step", 1)[1])
                       if n.startswith("vision_bridge_vlm_step") else -1)
        steps = [n for n in steps if n.startswith("vision_bridge_vlm_step")]
        for name in steps[:-keep]:
            self.result.checkpoints.pop(name).unlink(missing_ok=True)

    # ---- epochs ----------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        """Validation through the inference path: caption loss with each study's own image and
        with the images shifted by one study (the grounding gap), finding F1, sample reports;
        in fp32 on every device."""
        with full_precision(self.world.device):
            return self._validate_fp32(epoch)

    def _validate_fp32(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        records = self.loaders.val_records
        reports = [r.report for r in records]
        # Batch by batch: the validation split is never one tensor in memory.
        size = self.loaders.image_size
        own, shifted = split_grounding_losses(self.model, self.llm, records, size, self.cfg)
        scores = {"val_loss": own, "val_loss_shifted": shifted, "val_grounding_gap": shifted - own}
        if self.findings:
            predicted = split_findings(self.model, records, size)
            scores.update(label_f1(reports, predicted, prefix="val_"))
        shown = records[: self.cfg.n_val_reports]
        generated = self.generate(shown) if shown else []
        self.result.val_reports = [{"epoch": epoch, "id": r.id, "reference": r.report,
                                    "generated": g} for r, g in zip(shown, generated)]
        if generated:
            scores.update({f"val_{k}": v for k, v in language_scores(generated, self.style).items()})
        self.model.train()
        return scores

    def generate(self, records) -> list[str]:
        """Greedy reports for records."""
        return generate_reports(self.model, self.llm,
                                to_device(self.loaders.images(records), self.world.device),
                                self.cfg.prompt,
                                min(self.cfg.max_new_tokens, self.report_token_limit),
                                findings=self.findings,
                                system=self.cfg.system_prompt, absent=self.cfg.prompt_absent,
                                repair=self.cfg.resolve_contradictions,
                                repetition_penalty=self.cfg.repetition_penalty,
                                no_repeat_ngram_size=self.cfg.no_repeat_ngram_size)

    def _image_ignored(self) -> bool:
        """True when the grounding gap stayed under its floor for cfg.ignored_epochs epochs
        (or for every epoch of a run shorter than that)."""
        series = self.epoch_history.setdefault("val_grounding_gap", [])
        needed = min(self.cfg.ignored_epochs, self.cfg.epochs)  # a shorter run: all its epochs
        recent = [v for _, v in series[-needed:]]
        return len(recent) == needed and max(recent) < self.cfg.min_grounding_gap

    def _end_epoch(self, epoch: int, losses: list[float]) -> None:
        train_loss = sum(losses) / max(1, len(losses))
        if not self.world.is_main:  # rank 0 validates and judges for the group
            self.result.final_train_loss, self.result.epochs_done = train_loss, epoch
            return
        scores = self._validate(epoch)
        val_loss, gap = scores["val_loss"], scores["val_grounding_gap"]
        verdict = judge_epoch(train_loss, epoch, self.cfg.bands)
        texts = [r["generated"] for r in self.result.val_reports]
        self.epoch_history["epoch_train_loss"].append((epoch, train_loss))
        self.epoch_history["val_loss"].append((epoch, val_loss))
        self.epoch_history.setdefault("val_grounding_gap", []).append((epoch, gap))
        if self._image_ignored():
            verdict = (f"image ignored (grounding gap {gap:.4f} < {self.cfg.min_grounding_gap:g} "
                       f"for {len(self.epoch_history['val_grounding_gap'][-self.cfg.ignored_epochs:])} epochs)")
            self._flag_image_ignored(gap)
        self.result.verdicts[epoch] = verdict
        self.log_metrics({"epoch_train_loss": train_loss, **scores,
                          "curve_in_band": float(verdict == "healthy"),
                          "val_distinct_share": distinct_share(texts)}, epoch)
        self.set_tags({"stage2.curve_verdict": f"epoch {epoch}: {verdict}"})
        self.log.info("epoch %d: train %.4f val %.4f grounding gap %.4f curve %s | e.g. %r",
                      epoch, train_loss, val_loss, gap, verdict, (texts or [""])[0][:120])
        (self.out_dir / "val_reports").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "val_reports" / f"epoch{epoch:03d}.json").write_text(
            json.dumps(self.result.val_reports, indent=2), encoding="utf-8")
        self._flag_low_loss(texts)
        self.result.final_train_loss, self.result.epochs_done = train_loss, epoch
        if val_loss < self.result.best_val_loss:
            self.result.best_val_loss = val_loss
            self.save("best_val")

    def _flag_image_ignored(self, gap: float) -> None:
        message = (f"THE MODEL IGNORES THE IMAGE: validation caption loss with the images "
                   f"shifted by one study is only {gap:.4f} nats above the loss with their own "
                   f"images (floor {self.cfg.min_grounding_gap:g}) for "
                   f"{len(self.epoch_history['val_grounding_gap'][-self.cfg.ignored_epochs:])} "
                   "epochs. It writes the same report whatever the "
                   "image; a falling loss curve here is the LLM learning the report style.")
        self.log.error("!" * 20 + " " + message)
        self.result.image_ignored = True
        self.set_tags({IMAGE_IGNORED_TAG: "true", "stage2.image_ignored_reason": message[:500]})

    def _flag_low_loss(self, texts: list[str]) -> None:
        recent = [v for _, v in self.epoch_history["epoch_train_loss"][-self.cfg.low_loss_epochs:]]
        if len(recent) == self.cfg.low_loss_epochs and max(recent) < self.cfg.low_loss \
                and degenerate(texts):
            message = (f"LOSS UNDER {self.cfg.low_loss} FOR {len(recent)} EPOCHS WHILE THE "
                       "GENERATED VALIDATION REPORTS ARE DEGENERATE: the data or the labels "
                       "are wrong (check label masking and report/image pairing).")
            self.log.error("!" * 20 + " " + message)
            self.set_tags({"stage2.alarm": message})

    def fit(self) -> Stage2Result:
        """Train to cfg.epochs (continuing from `self.state` when resumed)."""
        self._t0 = time.monotonic() - self.state.seconds
        if self.cfg.llm_checksum and not self.result.llm_checksum_before:
            self.result.llm_checksum_before = self.llm.checksum()
        self.model.train()
        total = self.cfg.epochs * self.loaders.batches_per_epoch
        bar = tqdm(total=total, initial=self.state.step, desc="stage2", unit="step",
                   dynamic_ncols=True)
        try:
            for epoch in range(max(1, self.state.epoch), self.cfg.epochs + 1):
                self.state.epoch = epoch
                losses = list(self.state.epoch_losses)
                for batch in self.loaders.epoch(epoch, self.state.batch_in_epoch):
                    with interrupts.atomic():  # a stop signal waits for the step to end
                        losses.append(self._step(batch, epoch))
                        self.state.batch_in_epoch += 1
                        self.state.epoch_losses = losses
                        if self.state.step % self.cfg.checkpoint_every == 0:
                            self._checkpoint()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                with interrupts.atomic():
                    self._end_epoch(epoch, losses)
                    self.world.barrier()
                    self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
                    self.state.epoch_losses = []
                    self._checkpoint()
        except KeyboardInterrupt:
            # Between steps: weights, optimizer, counters, CSV and metrics agree; saving here
            # loses nothing, and the metrics sent are exactly those the checkpoint covers.
            self.log.warning("interrupted after step %d: saving a step checkpoint", self.state.step)
            self._checkpoint(interrupted=True)
            raise
        finally:
            bar.close()
        self.state.epoch = self.cfg.epochs
        self._finish()
        return self.result

    def _checkpoint(self, interrupted: bool = False) -> None:
        # Metrics are sent only right after a step checkpoint: after a kill, MLflow never
        # holds a step the resumed run will log again.
        self.state.seconds = time.monotonic() - self._t0
        self.save("step", interrupted=interrupted)
        self.flush()

    def _finish(self) -> None:
        self.save("final", self.result.final_train_loss)
        if self.cfg.llm_checksum:  # every rank checks its own copy of the LLM
            self.result.llm_checksum_after = self.llm.checksum()
            changed = self.result.llm_checksum_after != self.result.llm_checksum_before
            self.world.agree(GuardError(
                "the LLM's weights changed during training (checksum "
                f"{self.result.llm_checksum_before[:12]} -> "
                f"{self.result.llm_checksum_after[:12]})") if changed else None)
