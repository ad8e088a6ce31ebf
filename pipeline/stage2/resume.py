"""Stage 2's step checkpoints, as `pipeline.train.resume` finds them."""
from __future__ import annotations

from pathlib import Path

from pipeline.stage2.trainer import STEP_STEM
from pipeline.train import resume as shared


def latest_step_checkpoint(out_dir: str | Path, required: bool = False) -> Path | None:
    """Stage 2's step checkpoint with the highest step in `out_dir/checkpoints`, if any."""
    return shared.latest_step_checkpoint(out_dir, STEP_STEM, required)
