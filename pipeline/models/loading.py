"""Rebuild a vision-bridge from a checkpoint and measure its feature health on a probe batch.

Used by the gate for bare checkpoints and by Stage 2 before it initialises from weights.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import config as C
from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.train.health import feature_health


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


def _output_dim(tensors: dict[str, torch.Tensor], default: int) -> int:
    last = tensors.get("bridge.proj.2.weight")  # (out_dim, hidden): the projector's last Linear
    return int(last.shape[0]) if last is not None else default


def load_vision_bridge(path: str | Path, fallback: C.Stage1Config):
    """(model, metadata, stage1 config) from a safetensors or legacy `.pt` checkpoint."""
    from pipeline.models.vision_bridge import VisionBridge

    tensors, metadata = load_checkpoint(path)
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    cfg = stage1_config_of(metadata, fallback)
    cfg = replace(cfg, embed_dim=_output_dim(tensors, cfg.embed_dim))
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the vision-bridge of its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); pass the profile it was "
            "trained with")
    return model.eval(), metadata, cfg


@torch.no_grad()
def probe_health(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Feature health of `model` on a probe batch of images."""
    model.eval()
    return feature_health(model(images))


def probe_images(data_cfg: C.DataConfig, image_size: int, n: int) -> torch.Tensor:
    """The first `n` validation images of the data, as a batch."""
    from pipeline.data import ImageReportDataset, collate, load_dataset

    records = load_dataset(data_cfg)
    pool = records["val"] or records["test"] or records["train"]
    dataset = ImageReportDataset(pool[:n], image_size)
    return collate([dataset[i] for i in range(len(dataset))])["images"]
