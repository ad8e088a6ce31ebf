"""Judging a Stage 2 caption-loss curve against healthy bands (pure functions)."""
from __future__ import annotations

from typing import Sequence

Band = tuple[float, float, float]  # (epoch, low, high)


def band_at(bands: Sequence[Band], epoch: float) -> tuple[float, float]:
    """The healthy (low, high) at `epoch`, linearly interpolated, clamped at both ends."""
    bands = sorted((float(e), float(lo), float(hi)) for e, lo, hi in bands)
    if epoch <= bands[0][0]:
        return bands[0][1], bands[0][2]
    for (e0, lo0, hi0), (e1, lo1, hi1) in zip(bands, bands[1:]):
        if epoch <= e1:
            t = (epoch - e0) / (e1 - e0)
            return lo0 + t * (lo1 - lo0), hi0 + t * (hi1 - hi0)
    return bands[-1][1], bands[-1][2]


def judge_epoch(loss: float, epoch: int, bands: Sequence[Band]) -> str:
    """`healthy`, `high` (learning slower than healthy runs) or `low` (suspiciously fast)."""
    low, high = band_at(bands, epoch)
    if loss > high:
        return "high"
    if loss < low:
        return "low"
    return "healthy"


def distinct_share(texts: Sequence[str]) -> float:
    """Share of distinct (whitespace-normalised, lowercased) texts; 0 for none."""
    if not texts:
        return 0.0
    return len({" ".join(t.lower().split()) for t in texts}) / len(texts)


def degenerate(texts: Sequence[str], min_words: int = 5, min_distinct: float = 0.5) -> bool:
    """Generated reports that are empty/very short or mostly identical."""
    if not texts:
        return True
    short = sum(len(t.split()) < min_words for t in texts) / len(texts)
    return short > 0.5 or (len(texts) > 1 and distinct_share(texts) < min_distinct)
