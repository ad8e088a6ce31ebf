"""Passes over a whole split in batches: memory holds one batch of films, whatever the split's
size. Stage 2's per-epoch validation and `evaluate` use them."""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.data import ImageReportDataset, collate, image_batches
from pipeline.device import cpu_bf16_region, to_device
from pipeline.models.report_model import caption_forward


@torch.no_grad()
def split_grounding_losses(model, llm, records: Sequence, image_size: int, cfg,
                           batch_size: int = 16) -> tuple[float, float]:
    """`grounding_losses` over `records`, decoding one batch at a time.

    The same batches and pairs as `grounding_losses(images of all records, ...)`: report i is
    scored with its own image and with study i-1's (the first with the last's), so the two
    give the same numbers; only the films are read when their batch comes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dataset = ImageReportDataset(list(records), image_size)
    n = len(dataset)
    own_sum = shifted_sum = 0.0
    # study i-1 of the first batch
    previous = to_device(dataset[n - 1]["image"], device) if n else None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = collate([dataset[i] for i in range(start, stop)])
        images, reports = to_device(batch["images"], device), batch["reports"]
        shifted = torch.cat([previous[None], images[:-1]])
        previous = images[-1]
        weight = len(reports) / n
        with cpu_bf16_region(device, getattr(cfg, "cpu_bf16", False)):
            own_sum += weight * float(caption_forward(model, llm, images, reports, cfg).loss)
            shifted_sum += weight * float(caption_forward(model, llm, shifted, reports, cfg).loss)
    model.train(was_training)
    return own_sum, shifted_sum


@torch.no_grad()
def split_findings(model, records: Sequence, image_size: int,
                   batch_size: int = 16) -> list[dict[str, int]]:
    """The finding head's decoded labels for every record, one batch of films at a time."""
    was_training = model.training
    model.eval()
    labels: list[dict[str, int]] = []
    device = next(model.parameters()).device
    for images in image_batches(list(records), image_size, batch_size):
        labels += model.decode_findings(model.findings(to_device(images, device)))
    model.train(was_training)
    return labels
