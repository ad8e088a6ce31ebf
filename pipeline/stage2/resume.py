"""Stage 2's resume points: its step-checkpoint names and extras over the shared resume state
(`pipeline.train.resume`)."""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import STAGE2_FINAL
from pipeline.train import resume as shared
from pipeline.train.resume import (ResumeState, append_csv_row, optimizer_tensors,  # noqa: F401
                                   restore_optimizer, resume_block, same_config,
                                   state_from_metadata, truncate_csv)

STEP_STEM = "vision_bridge_vlm_step"


def latest_step_checkpoint(out_dir: str | Path, required: bool = False) -> Path | None:
    """Stage 2's step checkpoint with the highest step in `out_dir/checkpoints`, if any."""
    return shared.latest_step_checkpoint(out_dir, STEP_STEM, required)


def find_interrupted(output_dir: str | Path) -> Path | None:
    """The newest Stage 2 run folder with step checkpoints but no final checkpoint."""
    return shared.find_interrupted(output_dir, STEP_STEM, STAGE2_FINAL)


def find_resumable(output_dir: str | Path, cfg, world_size: int
                   ) -> tuple[tuple[Path, dict] | None, list[str]]:
    """The newest interrupted Stage 2 run trained with `cfg` on `world_size` ranks (its step
    checkpoint and metadata), or None; and why the other interrupted runs were passed over."""
    return shared.find_resumable(output_dir, STEP_STEM, STAGE2_FINAL, cfg, world_size)


def resume_extras(result, epoch_history, world_size: int) -> dict:
    """What Stage 2 keeps beside the counters: what the finished epochs concluded, the LLM
    checksum, the history, and the number of ranks (the global batch depends on it)."""
    return {"first_step_loss": result.first_step_loss, "best_val_loss": result.best_val_loss,
            "final_train_loss": result.final_train_loss, "epochs_done": result.epochs_done,
            "image_ignored": result.image_ignored,
            "llm_checksum_before": result.llm_checksum_before,
            "epoch_history": epoch_history, "verdicts": result.verdicts,
            "world_size": world_size}


def restore_result(result, resume: dict) -> None:
    """Put a saved resume block's results back (what the finished epochs concluded)."""
    result.first_step_loss = resume["first_step_loss"]
    result.best_val_loss = resume["best_val_loss"]
    result.llm_checksum_before = resume["llm_checksum_before"]
    result.final_train_loss = resume.get("final_train_loss", result.final_train_loss)
    result.epochs_done = resume.get("epochs_done", result.epochs_done)
    result.image_ignored = resume.get("image_ignored", result.image_ignored)
    result.verdicts = {int(epoch): verdict for epoch, verdict in resume["verdicts"].items()}
