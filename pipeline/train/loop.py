"""The training loop both stages share.

`TrainLoop` owns the epochs and steps (with a progress bar), the per-step CSV log, the step,
best and final checkpoints with their metadata, the save on interrupt or failure, and resume
from a step checkpoint. A stage subclasses it and provides the hooks: `_train_step` (one
optimizer step), `step_metrics` (a CSV row's metrics), `_end_epoch` (validate, judge, log),
`_metadata` and `_weights` (what its checkpoints carry), `_load_weights`, and
`_resume_extras` / `_restore_extras` (its own results beside the loop's).

The loop reports through `log_metrics(metrics, step)` / `set_tags(tags)`, never a tracker.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pipeline import interrupts
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import to_dict
from pipeline.device import rng_state, set_rng_state
from pipeline.train.distributed import World
from pipeline.train.resume import (ResumeState, append_csv_row, optimizer_tensors,
                                   restore_optimizer, state_from_metadata, truncate_csv)

LogMetrics = Callable[[Mapping[str, float], int], None]
SetTags = Callable[[Mapping[str, str]], None]
RNG_PREFIX = "rng."


class TrainLoop:
    """One training run (fresh or resumed from a step checkpoint) on one rank.

    Subclasses set `name` (the stage), `step_stem` and `final_stem` (checkpoint names
    `<step_stem><N>`, `<final_stem>_<kind>`), `keep_steps` (step checkpoints kept, None: all)
    and `epoch_checkpoint` (a step checkpoint after each epoch's end too), and build
    `self.model`, `self.optimizer`, `self.scheduler` and `self.result` (a result with
    `final_train_loss`, `best_val_loss`, `epochs_done` and `checkpoints`).
    """

    name = ""
    step_stem = ""
    final_stem = ""
    keep_steps: int | None = None
    epoch_checkpoint = False

    def __init__(self, cfg, loaders, out_dir: str | Path, run_id: str, log_metrics: LogMetrics,
                 set_tags: SetTags, logger: logging.Logger, flush: Callable[[], None],
                 world: World):
        self.cfg, self.loaders, self.world = cfg, loaders, world
        self.out_dir, self.run_id = Path(out_dir), run_id
        self.log_metrics, self.set_tags, self.log, self.flush = log_metrics, set_tags, logger, flush
        self.state = ResumeState()
        self.csv_path = self.out_dir / f"{self.name}_train_log.csv"
        self.epoch_history: dict[str, list] = {}  # per-epoch metric -> [(epoch, value)]
        self._rng: dict[str, torch.Tensor] = {}  # a resumed run's RNG state, set by fit
        self._t0 = time.monotonic()

    @property
    def step(self) -> int:
        return self.state.step

    # ---- hooks -----------------------------------------------------------------------------
    def _train_step(self, batch) -> tuple[float, dict]:
        """One optimizer step at `self.step + 1`: the global mean loss and the CSV columns."""
        raise NotImplementedError

    def step_metrics(self, row: Mapping) -> dict[str, float]:
        """The per-step metrics of a CSV row (as written, or read back on resume)."""
        raise NotImplementedError

    def _end_epoch(self, epoch: int, train_loss: float) -> float | None:
        """Validate, judge and log an epoch on rank 0; its validation loss (None elsewhere)."""
        raise NotImplementedError

    def _metadata(self) -> dict:
        """The stage's own checkpoint metadata."""
        return {}

    def _weights(self, kind: str) -> dict[str, torch.Tensor]:
        """The tensors a `kind` checkpoint holds (the optimizer's are added to step ones)."""
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def _load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _resume_extras(self) -> dict:
        return {}

    def _restore_extras(self, resume: Mapping) -> None:
        pass

    # ---- one step --------------------------------------------------------------------------
    def _step(self, batch, epoch: int) -> float:
        """One optimizer step, counted, written to the CSV (rank 0) and logged."""
        value, columns = self._train_step(batch)
        self.state.step += 1
        row = {"step": self.step, "epoch": epoch, **columns,
               "seconds": round(time.monotonic() - self._t0, 3)}
        if self.world.is_main:
            append_csv_row(self.csv_path, list(row), row)
        self.log_metrics(self.step_metrics(row), self.step)
        return value

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, kind: str, final_loss: float | None = None,
             interrupted: bool = False) -> Path | None:
        """Write a checkpoint (rank 0 only); step checkpoints carry the resume state."""
        if not self.world.is_main:
            return None
        step = kind == "step"
        name = f"{self.step_stem}{self.step}" if step else f"{self.final_stem}_{kind}"
        meta = {"stage": self.name, "run_id": self.run_id, "kind": kind, "lr": self.cfg.lr,
                "final_loss": final_loss, "step": self.step,
                "epoch": self.state.epoch if step else self.result.epochs_done,
                "config": json.dumps(to_dict(self.cfg), sort_keys=True), "format_version": 1,
                **self._metadata(), "interrupted": interrupted}
        tensors = self._weights(kind)
        if step:
            tensors = tensors | optimizer_tensors(self.optimizer) | {
                RNG_PREFIX + k: v for k, v in rng_state(self.world.device).items()}
            meta.update(self.state.to_metadata(
                self.optimizer, self.scheduler, best_val_loss=self.result.best_val_loss,
                final_train_loss=self.result.final_train_loss,
                epochs_done=self.result.epochs_done, epoch_history=self.epoch_history,
                world_size=self.world.size, **self._resume_extras()))
        path = save_checkpoint(self.out_dir / "checkpoints" / name, tensors, meta)
        self.result.checkpoints[name] = path
        if step and self.keep_steps is not None:
            self._prune_steps(self.keep_steps)
        return path

    def _prune_steps(self, keep: int) -> None:
        # Each step checkpoint holds the optimizer state (3x the weights).
        steps = sorted((n for n in self.result.checkpoints
                        if n.removeprefix(self.step_stem).isdigit()),
                       key=lambda n: int(n.removeprefix(self.step_stem)))
        for name in steps[:-keep]:
            self.result.checkpoints.pop(name).unlink(missing_ok=True)

    def _checkpoint(self, interrupted: bool = False) -> None:
        # Metrics are sent only right after a step checkpoint: after a kill, MLflow never
        # holds a step the resumed run will log again.
        self.state.seconds = time.monotonic() - self._t0
        self.save("step", interrupted=interrupted)
        self.flush()

    def _between_steps(self) -> bool:
        """Whether the weights are those of `self.step`: no optimizer update is half done."""
        done = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(done, default=self.step) == self.step

    # ---- resume ----------------------------------------------------------------------------
    def restore(self, ckpt: Path, resume: Mapping) -> int:
        """Continue from the step checkpoint `ckpt` (`resume`: its resume block): weights,
        optimizer, scheduler, counters, results, history and (at `fit`) the RNG state;
        rank 0 also takes up the run's earlier checkpoints and drops the CSV rows after the
        step. Returns the CSV rows kept."""
        tensors, _ = load_checkpoint(ckpt, self.world.device)
        self._load_weights(tensors)
        restore_optimizer(self.optimizer, self.scheduler, tensors, resume)
        self.state = state_from_metadata(resume)
        self.result.best_val_loss = resume["best_val_loss"]
        self.result.final_train_loss = resume.get("final_train_loss", self.result.final_train_loss)
        self.result.epochs_done = resume.get("epochs_done", self.result.epochs_done)
        self.epoch_history = {k: [tuple(x) for x in v] for k, v in resume["epoch_history"].items()}
        self._restore_extras(resume)
        self._rng = {k[len(RNG_PREFIX):]: v for k, v in tensors.items() if k.startswith(RNG_PREFIX)}
        if not self.world.is_main:
            return 0
        self.result.checkpoints.update({p.name.removesuffix(".safetensors"): p for p in
                                        sorted((self.out_dir / "checkpoints").glob("*.safetensors"))})
        return truncate_csv(self.csv_path, self.step)

    # ---- the loop --------------------------------------------------------------------------
    def _close_epoch(self, epoch: int) -> None:
        losses = self.state.epoch_losses
        train_loss = sum(losses) / max(1, len(losses))
        self.result.final_train_loss, self.result.epochs_done = train_loss, epoch
        val_loss = self._end_epoch(epoch, train_loss)
        if val_loss is not None and val_loss < self.result.best_val_loss:
            self.result.best_val_loss = val_loss
            self.save("best_val")
        self.state.epoch, self.state.batch_in_epoch, self.state.epoch_losses = epoch + 1, 0, []
        self.world.barrier()  # the other ranks wait while rank 0 validates

    def fit(self):
        """Train to cfg.epochs (continuing from `self.state` when resumed), then save the final
        checkpoint. When stopped (interrupt, guard, a lost rank) between steps, save a step
        checkpoint with the resume state (`interrupted: true`) and re-raise."""
        self._t0 = time.monotonic() - self.state.seconds
        if self._rng:
            set_rng_state(self.world.device, self._rng)
        self.model.train()
        bar = tqdm(total=self.cfg.epochs * self.loaders.batches_per_epoch, initial=self.step,
                   desc=self._description(), unit="step", dynamic_ncols=True,
                   disable=not self.world.is_main)
        # Several ranks: a stop signal is held for the whole loop and acted on only where
        # the ranks agree on it, after each step and each epoch's end, so that every rank
        # stops after the same step (a rank that stopped one step early would leave its peer's
        # next all-reduce facing a closed connection: a FAILED run instead of KILLED).
        held = interrupts.atomic() if self.world.distributed else contextlib.nullcontext()
        try:
            with held:
                for epoch in range(self.state.epoch, self.cfg.epochs + 1):
                    self.state.epoch = epoch
                    for batch in self.loaders.epoch(epoch, self.state.batch_in_epoch):
                        with interrupts.atomic():  # a stop signal waits for the step to end
                            loss = self._step(batch, epoch)
                            self.state.batch_in_epoch += 1
                            self.state.epoch_losses.append(loss)
                            if self.step % self.cfg.checkpoint_every == 0:
                                self._checkpoint()
                        self._stop_if_any_rank_was_stopped()
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
                    with interrupts.atomic():
                        self._close_epoch(epoch)
                        if self.epoch_checkpoint:
                            self._checkpoint()
                    self._stop_if_any_rank_was_stopped()
        except BaseException as exc:  # interrupted, a guard, a lost rank: save where it stands
            if self._between_steps():
                self.log.warning("%s at step %d: saving a step checkpoint",
                                 "interrupted" if isinstance(exc, KeyboardInterrupt)
                                 else type(exc).__name__, self.step)
                self._checkpoint(interrupted=True)
            raise
        finally:
            bar.close()
        self.state.epoch = self.cfg.epochs
        self.save("final", self.result.final_train_loss)
        return self.result

    def _stop_if_any_rank_was_stopped(self) -> None:
        """Several ranks: raise the stop on every rank when it reached any of them (one
        all-reduce of a flag); a single process raises it at the end of `atomic()` itself."""
        if self.world.distributed and self.world.any_rank(interrupts.pending()):
            raise KeyboardInterrupt(interrupts.take() or "a stop signal on another rank")

    def _description(self) -> str:
        return self.name
