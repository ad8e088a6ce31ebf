"""Resume state for Stage 2: where training stood at a step checkpoint, and how to restore it.

Optimizer tensors go into the safetensors file under `optim.`; everything else (step, epoch,
position inside the epoch, scheduler state, param groups) into its JSON metadata.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError
from pipeline.config import to_dict

OPTIM_PREFIX = "optim."


@dataclass
class ResumeState:
    """Counters that locate a run inside its schedule."""

    step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0

    def to_metadata(self, optimizer, scheduler, result, epoch_history) -> dict:
        """Everything needed to continue, as JSON-able metadata."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                  for g in optimizer.state_dict()["param_groups"]]
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"resume": {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "epoch_losses": self.epoch_losses, "seconds": self.seconds,
            "param_groups": groups, "scheduler": sched,
            "first_step_loss": result.first_step_loss, "best_val_loss": result.best_val_loss,
            "final_train_loss": result.final_train_loss, "epochs_done": result.epochs_done,
            "image_ignored": result.image_ignored,
            "llm_checksum_before": result.llm_checksum_before,
            "epoch_history": epoch_history, "verdicts": result.verdicts}}


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors (`optim.<idx>.<key>`)."""
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{OPTIM_PREFIX}{idx}.{key}"] = tensor
    return out


def restore_optimizer(optimizer, scheduler, tensors: dict, resume: dict) -> None:
    """Load optimizer + scheduler state saved by `optimizer_tensors` / `to_metadata`."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            idx, key = name[len(OPTIM_PREFIX):].split(".", 1)
            state.setdefault(int(idx), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": resume["param_groups"]})
    scheduler.load_state_dict(resume["scheduler"] | {"lr_lambdas": [None] * len(optimizer.param_groups)})


def restore_result(result, resume: dict) -> None:
    """Put a saved resume block's results back (what the finished epochs concluded)."""
    result.first_step_loss = resume["first_step_loss"]
    result.best_val_loss = resume["best_val_loss"]
    result.llm_checksum_before = resume["llm_checksum_before"]
    result.final_train_loss = resume.get("final_train_loss", result.final_train_loss)
    result.epochs_done = resume.get("epochs_done", result.epochs_done)
    result.image_ignored = resume.get("image_ignored", result.image_ignored)
    result.verdicts = {int(epoch): verdict for epoch, verdict in resume["verdicts"].items()}


def state_from_metadata(resume: dict) -> ResumeState:
    """The counters of a saved resume block."""
    return ResumeState(step=resume["step"], epoch=resume["epoch"],
                       batch_in_epoch=resume["batch_in_epoch"],
                       epoch_losses=list(resume["epoch_losses"]), seconds=resume["seconds"])


def truncate_csv(path: str | Path, last_step: int) -> int:
    """Drop CSV rows with step > last_step (done after the checkpoint); returns rows kept."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, [r for r in reader if int(r["step"]) <= last_step]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return len(rows)


def same_config(saved: dict, cfg) -> bool:
    """Whether a config read back from a checkpoint's JSON equals a live one.

    Compared in JSON form: JSON has no tuples, so `bands` comes back as lists.
    """
    def as_json(value):
        return json.loads(json.dumps(value, sort_keys=True))

    return as_json(saved) == as_json(to_dict(cfg))


def latest_step_checkpoint(out_dir: str | Path, required: bool = False) -> Path | None:
    """The step checkpoint with the highest step in `out_dir/checkpoints`, if any.

    `required`: raise CheckpointError naming the folder instead of returning None.
    """
    paths = list((Path(out_dir) / "checkpoints").glob("vision_bridge_vlm_step*.safetensors"))
    if not paths:
        if required:
            raise CheckpointError(f"cannot resume {out_dir}: it holds no step checkpoint "
                                  "(checkpoints/vision_bridge_vlm_step<N>.safetensors)")
        return None
    return max(paths, key=lambda p: int(p.stem.removeprefix("vision_bridge_vlm_step")))

