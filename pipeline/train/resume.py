"""Resume state shared by both stages: where training stood at a step checkpoint, how to
restore it, and which run folder to continue.

Optimizer tensors go into the safetensors file under `optim.`; everything else (step, epoch,
position inside the epoch, scheduler state, param groups, the stage's own extras) into its
JSON metadata under `resume`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError, final_checkpoint_path, read_metadata
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

    def to_metadata(self, optimizer, scheduler, **extra) -> dict:
        """Everything needed to continue, as JSON-able metadata (`extra`: the stage's own)."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                  for g in optimizer.state_dict()["param_groups"]]
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"resume": {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "epoch_losses": self.epoch_losses, "seconds": self.seconds,
            "param_groups": groups, "scheduler": sched, **extra}}


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


def append_csv_row(path: Path, fields, row) -> None:
    """Append one row to a CSV log, writing the header first when the file is new (its folder
    too: a trainer driven from a script, not a job, writes where it is told)."""
    new = not path.exists()
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def same_config(saved: dict, cfg) -> bool:
    """Whether a config read back from a checkpoint's JSON equals a live one.

    Compared in JSON form: JSON has no tuples, so `bands` comes back as lists.
    """
    def as_json(value):
        return json.loads(json.dumps(value, sort_keys=True))

    return as_json(saved) == as_json(to_dict(cfg))


def latest_step_checkpoint(out_dir: str | Path, stem: str, required: bool = False) -> Path | None:
    """The step checkpoint `<stem><N>.safetensors` with the highest N in `out_dir/checkpoints`.

    `required`: raise CheckpointError naming the folder instead of returning None.
    """
    paths = list((Path(out_dir) / "checkpoints").glob(f"{stem}*.safetensors"))
    paths = [p for p in paths if p.stem.removeprefix(stem).isdigit()]
    if not paths:
        if required:
            raise CheckpointError(f"cannot resume {out_dir}: it holds no step checkpoint "
                                  f"(checkpoints/{stem}<N>.safetensors)")
        return None
    return max(paths, key=lambda p: int(p.stem.removeprefix(stem)))


def resume_block(ckpt: Path, meta: dict, world_size: int) -> dict:
    """The resume block of a step checkpoint's metadata; refused when it has none, or when
    it was trained on another number of ranks (the global batch and data order depend on it)."""
    resume = meta.get("resume")
    if not isinstance(resume, dict):
        raise CheckpointError(f"cannot resume from {ckpt}: it holds no resume state (written "
                              "before step checkpoints carried it)")
    saved = resume.get("world_size", 1)
    if saved != world_size:
        raise CheckpointError(f"cannot resume {ckpt} on {world_size} process(es): it was "
                              f"trained on {saved} (the global batch and data order depend on it)")
    return resume


def interrupted_runs(output_dir: str | Path, stem: str, final_name: str) -> list[Path]:
    """Run folders with step checkpoints `<stem><N>` but no `final_name` checkpoint, newest
    first."""
    candidates = [d for d in Path(output_dir).glob("*") if d.is_dir()
                  and latest_step_checkpoint(d, stem) is not None
                  and not (d / final_checkpoint_path(final_name)).exists()]
    return sorted(candidates, key=lambda d: latest_step_checkpoint(d, stem).stat().st_mtime,
                  reverse=True)


def find_resumable(output_dir: str | Path, stem: str, final_name: str, cfg, world_size: int,
                   strict: bool = False) -> tuple[tuple[Path, dict] | None, list[str]]:
    """The newest interrupted run trained with `cfg` on `world_size` ranks: (its latest step
    checkpoint, its metadata), or None; and why each other interrupted run was passed over.

    Runs of another config are passed over. The newest run of `cfg` without resume state or
    trained on another number of ranks is refused (CheckpointError) when `strict`, else
    passed over too.
    """
    skipped = []
    for folder in interrupted_runs(output_dir, stem, final_name):
        ckpt = latest_step_checkpoint(folder, stem)
        try:
            meta = read_metadata(ckpt)
        except CheckpointError as exc:
            skipped.append(f"{folder.name}: {exc}")
            continue
        resume = meta.get("resume")
        if not isinstance(meta.get("config"), dict) or not same_config(meta["config"], cfg):
            skipped.append(f"{folder.name}: another config")
        elif strict:
            resume_block(ckpt, meta, world_size)
            return (ckpt, meta), skipped
        elif not isinstance(resume, dict):
            skipped.append(f"{folder.name}: no resume state")
        elif resume.get("world_size", 1) != world_size:
            skipped.append(f"{folder.name}: trained on {resume.get('world_size', 1)} process(es)")
        else:
            return (ckpt, meta), skipped
    return None, skipped


def resume_point(resume: str | None, output_dir: str | Path, stem: str, final_name: str, cfg,
                 world_size: int) -> tuple[tuple[Path, dict] | None, list[str]]:
    """The step checkpoint a run continues and its metadata (None: a new run), and the
    interrupted runs passed over and why.

    `resume`: a run folder (its latest step checkpoint; its config is the run's), "auto" (the
    newest interrupted run trained with `cfg`) or None. Refused (CheckpointError) without a
    step checkpoint holding resume state from as many ranks.
    """
    if resume is None:
        return None, []
    if resume == "auto":
        return find_resumable(output_dir, stem, final_name, cfg, world_size, strict=True)
    ckpt = latest_step_checkpoint(resume, stem, required=True)
    meta = read_metadata(ckpt)
    resume_block(ckpt, meta, world_size)
    return (ckpt, meta), []
