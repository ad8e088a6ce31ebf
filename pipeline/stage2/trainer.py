"""Stage 2: train vision + bridge against the frozen LLM with caption cross-entropy.

Guards, in order: before the first step the LLM is frozen and none of its parameters is in
the optimizer, and the first batches' labels supervise exactly the report + EOS positions;
after the first step a loss under 0.1 warns about label masking; every epoch the curve is
judged against healthy bands; after training the LLM's checksum must equal the one before.
The loop (`pipeline.train.loop.TrainLoop`) reports through `log_metrics` / `set_tags` and
writes files into `out_dir`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from pipeline.models import captioning
from pipeline.checkpoint import split_prefix
from pipeline.config import Stage2Config
from pipeline.device import autocast, full_precision, host_values, to_device
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
from pipeline.models.loading import load_into, model_tensors
from pipeline.train.common import build_optimizer, optimizer_step
from pipeline.train.distributed import SINGLE, World
from pipeline.train.loop import TrainLoop
from pipeline.train.split_pass import split_findings, split_grounding_losses

STYLE_SENTENCES = 5000  # training sentences a checkpoint carries for candidate choice
STEP_STEM = "vision_bridge_vlm_step"
IMAGE_IGNORED_TAG = "stage2.image_ignored"
LOW_FIRST_STEP = ("WARNING: first-step caption loss {loss:.4f} < 0.1. A healthy run starts "
                  "around 3-5; this almost always means label masking is broken (visual, "
                  "prompt or padding positions supervised).")


def step_metrics(row: Mapping, findings: bool) -> dict[str, float]:
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


class Stage2Trainer(TrainLoop):
    """One Stage 2 run (fresh or resumed from a step checkpoint) on one rank."""

    name, step_stem, final_stem = "stage2", STEP_STEM, "vision_bridge_vlm"
    keep_steps, epoch_checkpoint = 2, True  # each step checkpoint: 3x the weights

    def __init__(self, cfg: Stage2Config, model, llm, loaders, out_dir: str | Path, run_id: str,
                 log_metrics: Callable, set_tags: Callable, logger: logging.Logger,
                 label_fn: Callable = captioning.make_labels, flush: Callable = lambda: None,
                 world: World = SINGLE):
        super().__init__(cfg, loaders, out_dir, run_id, log_metrics, set_tags, logger, flush,
                         world)
        self.model, self.llm, self.label_fn = model, llm, label_fn
        self.result = Stage2Result()
        self.epoch_history: dict[str, list] = {"epoch_train_loss": [], "val_loss": [],
                                               "val_grounding_gap": []}
        self.findings = uses_findings(cfg, model)
        self.aux_findings = self.findings and cfg.aux_finding_weight > 0
        self.pos_weight = positive_weights([r.report for r in loaders.train.records],
                                           uncertain=cfg.data.uncertain) \
            if self.findings else None
        if self.aux_findings:  # the head goes on learning with this split's weights
            model.finding_head.set_prior(self.pos_weight)
        # placed once: the finding loss would otherwise copy it to the device every step
        self.step_pos_weight = to_device(self.pos_weight, world.device)
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
                              batch["reports"], self.cfg, true_labels, self.label_fn,
                              training=True)
        if check:
            self._check(out)
        aux = None
        if self.aux_findings:
            aux = finding_loss(out.logits, batch["reports"], self.step_pos_weight,
                               self.cfg.data.uncertain)
        # The caption loss is a mean over supervised tokens (the LM shifts labels by one); the
        # objective a mean over their weights (the same unless findings_weight is set).
        tokens = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
        if out.objective is None:
            return out.loss, out.loss, aux, out.layout, tokens, float(tokens)
        return out.loss, out.objective, aux, out.layout, tokens, out.weight

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

    def _train_step(self, batch) -> tuple[float, dict]:
        error, value, aux_value, tokens, weight = None, float("nan"), 0.0, 0, 0.0
        try:  # a guard firing on any rank stops every rank (World.mean)
            # bf16 LLM forward (and so backward) on CUDA, and on a bf16 CPU when asked
            with autocast(self.world.device, cpu=self.cfg.cpu_bf16):
                loss, objective, aux, layout, tokens, weight = self.step_model(
                    batch, self.step == 0)
            # the caption and finding losses for the log and the guard: one read of the device
            read = host_values(loss, *([aux] if aux is not None else []))
            value = check_finite_loss(read[0], self.step + 1)
            aux_value = check_finite_loss(read[1], self.step + 1) if aux is not None else 0.0
        except GuardError as exc:
            error = exc
        samples = len(batch["reports"]) if batch["weight"] else 0
        tokens = tokens if batch["weight"] else 0
        weight = weight if batch["weight"] else 0.0
        (value, all_tokens), (aux_value, all_samples), (_, all_weight) = self.world.mean(
            [(value, tokens), (aux_value, samples), (0.0, weight)], error)
        # Each rank's share of the global means (1 in one process): the ranks' averaged
        # gradients are then those of the global batch's token- (weight-) and sample-means.
        size = self.world.size
        total = objective * (weight * size / max(1e-8, all_weight))
        if aux is not None:
            total = total + self.cfg.aux_finding_weight * aux * (samples * size / max(1, all_samples))
        grad_norm = optimizer_step(self.trained, total, self.optimizer, self.scheduler,
                                   self.cfg.grad_clip, self.step + 1)
        if self.result.first_step_loss is None and self.step == 0:
            self.result.first_step_loss = value
            self.log_metrics({"first_step_loss": value}, 1)
            if value < self.cfg.low_loss:
                self.log.warning(LOW_FIRST_STEP.format(loss=value))
                self.set_tags({"stage2.first_step_warning": "loss<0.1: check label masking"})
        if layout.truncated:
            self.log_metrics({"truncated_reports": layout.truncated}, self.step + 1)
        # Logged as the CSV holds them, so a resumed run re-sends exactly the same values.
        return value, {"caption_loss": f"{value:.6f}", "finding_loss": f"{aux_value:.6f}",
                       "lr": f"{self.scheduler.get_last_lr()[0]:.6g}",
                       "grad_norm": f"{grad_norm:.4f}"}

    def step_metrics(self, row: Mapping) -> dict[str, float]:
        return step_metrics(row, self.aux_findings)

    # ---- checkpoints -----------------------------------------------------------------------
    def _metadata(self) -> dict:
        # The base LLM these weights and adapters were trained against: evaluation and
        # serving refuse another (`pipeline.models.loading.verify_base_llm`).
        return {"llm": self.cfg.llm.name, "llm_checksum": self.result.llm_checksum_before or "",
                "hidden_size": self.llm.hidden_size,
                "report_style": json.dumps(self.style.to_sentences()[:STYLE_SENTENCES]),
                "report_token_limit": self.report_token_limit}

    def _weights(self, kind: str) -> dict[str, torch.Tensor]:
        return super()._weights(kind) | {f"{ADAPTER_PREFIX}.{k}": v
                                         for k, v in self.llm.adapter_state().items()}

    def _load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_into(self.model, model_tensors(dict(tensors)), "the resume checkpoint")
        if self.adapters:
            self.llm.load_adapter_state(split_prefix(tensors, ADAPTER_PREFIX))

    def _resume_extras(self) -> dict:
        """What the finished epochs concluded beyond the loop's own, and the LLM checksum."""
        return {"first_step_loss": self.result.first_step_loss,
                "image_ignored": self.result.image_ignored,
                "llm_checksum_before": self.result.llm_checksum_before,
                "verdicts": self.result.verdicts}

    def _restore_extras(self, resume: Mapping) -> None:
        self.result.first_step_loss = resume["first_step_loss"]
        self.result.llm_checksum_before = resume["llm_checksum_before"]
        self.result.image_ignored = resume.get("image_ignored", self.result.image_ignored)
        self.result.verdicts = {int(epoch): v for epoch, v in resume["verdicts"].items()}

    # ---- epochs ----------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        """Validation through the inference path: caption loss with each study's own image and
        with the images shifted by one study (the grounding gap), finding F1, sample reports;
        in fp32 (the caption losses in bf16 on a bf16 CPU with `cpu_bf16`)."""
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

    def _end_epoch(self, epoch: int, train_loss: float) -> float | None:
        """Validate through the inference path, judge the curve and the grounding gap, log."""
        if not self.world.is_main:  # rank 0 validates and judges for the group
            return None
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
        return val_loss

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
        """Train (see `TrainLoop.fit`); the LLM's checksum must not change meanwhile."""
        if self.cfg.llm_checksum and not self.result.llm_checksum_before:
            self.result.llm_checksum_before = self.llm.checksum()
        super().fit()
        if self.cfg.llm_checksum:  # every rank checks its own copy of the LLM
            self.result.llm_checksum_after = self.llm.checksum()
            changed = self.result.llm_checksum_after != self.result.llm_checksum_before
            self.world.agree(GuardError(
                "the LLM's weights changed during training (checksum "
                f"{self.result.llm_checksum_before[:12]} -> "
                f"{self.result.llm_checksum_after[:12]})") if changed else None)
        return self.result
