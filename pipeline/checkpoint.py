"""Checkpoints: safetensors files that carry their own metadata.

Metadata (stage, run id, objective, lr, final loss, config, ...) is stored in the safetensors
header as strings; non-string values are JSON-encoded. Legacy `.pt` files are read with
`torch.load(weights_only=True)` and are never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pipeline.device import map_location, to_storage

SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold what it should."""


def _encode(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in metadata.items()}


def _decode(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, Any]) -> Path:
    """Write tensors + metadata atomically (temp file, then rename); returns the path."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Device-free (CPU) tensors, whatever the run computed on. safetensors refuses shared or
    # non-contiguous storage; clone makes each tensor its own.
    flat = {k: to_storage(v).contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata=_encode(metadata))
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a safetensors checkpoint without loading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _decode(handle.metadata())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | Path, device: torch.device | str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint: our safetensors, or a legacy `.pt` state dict;
    the tensors on `device` (default: the CPU they were saved from)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_legacy(path, device), {"format": "legacy-pt", "source_file": str(path)}
    try:
        tensors = load_file(str(path), device=map_location(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return tensors, read_metadata(path)


def _load_legacy(path: Path, device=None) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location=map_location(device), weights_only=True)
    except Exception as exc:  # torch raises several types for refused pickles
        raise CheckpointError(
            f"legacy checkpoint {path} cannot be read with weights_only=True "
            f"(it holds more than tensors, or is corrupt): {exc}") from exc
    # Common legacy layouts: a bare state dict, or {"model": sd}, {"state_dict": sd}.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"legacy checkpoint {path} does not hold a state dict of tensors")
    return dict(obj)


STAGE1_FINAL = "vision_bridge_final"
STAGE2_FINAL = "vision_bridge_vlm_final"


def final_checkpoint_path(stage_final: str) -> str:
    """The run-artifact path of a final checkpoint, e.g. `checkpoints/vision_bridge_vlm_final.safetensors`."""
    return f"checkpoints/{stage_final}.safetensors"


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
