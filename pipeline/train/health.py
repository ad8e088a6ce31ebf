"""Feature-health metrics of visual tokens, the same for every objective.

- `feature_std`: mean over dimensions of the per-dimension std of the raw visual tokens
  (over batch and tokens). Shrinking features (the `l2_proxy` collapse) drive it to zero.
- `normalized_std`: per-dimension std of the L2-normalised pooled features, times sqrt(dim)
  (SimSiam's collapse signal, scaled so that isotropic features give ~1 and one shared
  direction gives 0).
- `effective_rank`: RankMe, exp of the entropy of the normalised singular values of the
  pooled (per-image mean) features; 1 means every image maps to one direction.
"""
from __future__ import annotations

import math

import torch

from pipeline.config import HEALTH_KEYS, DataConfig, HealthConfig



@torch.no_grad()
@torch.no_grad()
def probe_health(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Feature health of `model` on a probe batch of images."""
    model.eval()
    return feature_health(model(images))


def probe_images(data_cfg: DataConfig, image_size: int, n: int) -> torch.Tensor:
    """The first `n` validation images of the data (else test, else train), as a batch."""
    from pipeline.data import image_batch, load_dataset

    records = load_dataset(data_cfg)
    pool = records["val"] or records["test"] or records["train"]
    return image_batch(pool[:n], image_size)


def feature_health(visual_tokens: torch.Tensor) -> dict[str, float]:
    """Health statistics of a probe batch of visual tokens (B, T, D)."""
    tokens = visual_tokens.detach().float()
    B, T, D = tokens.shape
    flat = tokens.reshape(B * T, D)
    feature_std = flat.std(dim=0, unbiased=False).mean().item()
    pooled = tokens.mean(dim=1)  # (B, D)
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    normalized_std = (unit.std(dim=0, unbiased=False).mean() * math.sqrt(D)).item()
    return {"feature_std": feature_std, "normalized_std": normalized_std,
            "effective_rank": effective_rank(pooled)}


def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> float:
    """RankMe (Garrido et al. 2023): exp(entropy of singular values / their sum)."""
    s = torch.linalg.svdvals(features.double())
    if s.sum() <= eps:
        return 0.0
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def health_failures(health: dict[str, float], cfg: HealthConfig) -> list[str]:
    """One reason per health metric below its floor (empty when healthy)."""
    reasons = []
    for key in HEALTH_KEYS:
        floor = cfg.floors()[key]
        value = health.get(key, float("nan"))
        if not (value >= floor):  # NaN fails too
            reasons.append(f"{key}={value:.3g} < {floor:g}")
    return reasons


def health_floor(key: str, cfg: HealthConfig) -> float:
    """The configured floor of one health metric."""
    return cfg.floors()[key]
