"""Where Stage 2's vision + bridge weights come from, decided in a fixed order.

1. `scratch` (or `--from_scratch`): fresh weights.
2. an explicit path, `runs:/` or `models:/` URI: that checkpoint, refused when its Stage 1
   run was rejected by the gate or its features are collapsed (unless forced).
3. `auto`: the newest `vision_bridge_vlm_final` of an earlier Stage 2 run (output folder,
   then experiment); else `models:/vision-bridge@stage2-ready`; else fresh.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline import config as C
from pipeline.checkpoint import STAGE2_FINAL, final_checkpoint_path
from pipeline.guards import GuardError
from pipeline.models.loading import stage1_config_of
from pipeline.train.health import health_failures, probe_health


@dataclass(frozen=True)
class InitChoice:
    """The chosen initialisation: `source` is what `init.source` is tagged with."""

    source: str  # scratch | checkpoint | previous-stage2 | registry
    path: Path | None = None
    uri: str | None = None
    note: str = ""


def _previous_stage2(output_dir: str) -> Path | None:
    finals = list(Path(output_dir).glob(f"*/{final_checkpoint_path(STAGE2_FINAL)}"))
    return max(finals, key=lambda p: p.stat().st_mtime) if finals else None


def choose_init(init: str, output_dir: str) -> InitChoice:
    """Resolve `init` (scratch / auto / path / URI) to a concrete choice."""
    from pipeline.tracking import registry

    if init == "scratch":
        return InitChoice("scratch", note="fresh weights (init=scratch)")
    if init != "auto":
        return InitChoice("checkpoint", registry.download_checkpoint(init), init,
                          note=f"explicit checkpoint {init}")
    previous = _previous_stage2(output_dir) or registry.latest_stage2_final()
    if previous is not None:
        return InitChoice("previous-stage2", Path(previous), str(previous),
                          note=f"continuing from the previous Stage 2 final weights {previous}")
    uri = f"models:/{registry.VISION_MODEL}@{registry.VISION_ALIAS}"
    try:
        path = registry.download_checkpoint(uri)
    except FileNotFoundError:
        return InitChoice("scratch", note=f"fresh weights: no earlier Stage 2 run and no {uri}")
    return InitChoice("registry", path, uri, note=f"gate-approved Stage 1 weights {uri}")


def adopt_architecture(cfg: C.Stage2Config, metadata: dict) -> C.Stage2Config:
    """Stage 2 config with the checkpoint's encoder and bridge sizes (weights must fit)."""
    source = stage1_config_of(metadata, None)
    if source is None:
        return cfg
    return replace(cfg, encoder=source.encoder,
                   bridge=replace(source.bridge, max_visual_tokens=cfg.bridge.max_visual_tokens))


def refuse_width_mismatch(choice: InitChoice, width: int | None, llm_name: str,
                          hidden_size: int) -> None:
    """Raise GuardError when the initial weights' visual tokens do not have the LLM's width."""
    if width is not None and width != hidden_size:
        raise GuardError(
            f"refusing to initialise Stage 2 from {choice.uri}: its visual tokens are {width} "
            f"wide but the LLM {llm_name!r} has hidden size {hidden_size}; use the LLM its "
            "Stage 1 was built for (the same profile), or --init scratch")


def refuse_if_unfit(choice: InitChoice, model, metadata: dict, gate_verdict: str | None,
                    probe: torch.Tensor, health_cfg: C.HealthConfig, force: bool) -> dict:
    """Raise GuardError when an explicit checkpoint is rejected or collapsed; return health."""
    health = probe_health(model, probe)
    reasons = []
    if gate_verdict == "rejected":
        reasons.append(f"its Stage 1 run {metadata.get('run_id')} was rejected by the gate")
    failures = health_failures(health, health_cfg)
    if failures:
        reasons.append("its features are collapsed (" + "; ".join(failures) + ")")
    if reasons and not force:
        raise GuardError(f"refusing to initialise Stage 2 from {choice.uri}: "
                         + " and ".join(reasons)
                         + ". Use --init scratch (--from_scratch), or --force_init to override")
    return health
