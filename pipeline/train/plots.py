"""Matplotlib figures of loss and health curves (Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import HEALTH_KEYS  # noqa: E402

Series = Sequence[tuple[int, float]]


def _xy(series: Series):
    return [s for s, _ in series], [v for _, v in series]


def plot_stage1(history: Mapping[str, Series], path: str | Path, floors: Mapping[str, float],
                title: str = "Stage 1") -> Path:
    """Train/val loss (log scale) and the three feature-health curves with their floors."""
    keys = [f"health_{key}" for key in HEALTH_KEYS]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    if history.get("train_loss"):
        ax.plot(*_xy(history["train_loss"]), lw=0.8, alpha=0.6, label="train_loss (step)")
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.set_xlabel("step")
    ax.axhline(1e-3, color="red", ls="--", lw=0.8, label="collapse warning (1e-3)")
    ax.set_title("loss")
    ax.legend(fontsize=7)
    twin = ax.twiny()
    for key, style in (("epoch_train_loss", "o-"), ("val_loss", "s-")):
        if history.get(key):
            twin.plot(*_xy(history[key]), style, ms=3, label=key)
    twin.set_xlabel("epoch")
    if twin.get_legend_handles_labels()[0]:
        twin.legend(fontsize=7, loc="center right")
    for ax, key in zip(axes[1:], keys):
        if history.get(key):
            ax.plot(*_xy(history[key]), "o-", ms=3)
        floor = floors.get(key.removeprefix("health_"))
        if floor is not None:
            ax.axhline(floor, color="red", ls="--", lw=0.8, label=f"floor {floor:g}")
            ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_stage2(steps: Series, epochs: Mapping[str, Series], bands: Sequence[tuple[int, float, float]],
                path: str | Path, max_epoch: int, title: str = "Stage 2 caption loss") -> Path:
    """Caption loss per step and per epoch, with the healthy band (up to `max_epoch`) shaded."""
    from pipeline.train.curve import band_at

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if bands:
        xs = [1 + i * (max(max_epoch, 2) - 1) / 100 for i in range(101)]
        lows, highs = zip(*(band_at(bands, x) for x in xs))
        ax.fill_between(xs, lows, highs, color="green", alpha=0.12, label="healthy band")
    if steps:
        ax.plot(*_xy(steps), lw=0.7, alpha=0.5, label="caption_loss (step, x in epochs)")
    for key, style in (("epoch_train_loss", "o-"), ("val_loss", "s-")):
        if epochs.get(key):
            ax.plot(*_xy(epochs[key]), style, ms=4, label=key)
    ax.axhline(0.1, color="red", ls="--", lw=0.8, label="0.1: check label masking")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
