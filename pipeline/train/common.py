"""Pieces both training stages share: seeding, optimizer + schedule, loaders, text logs."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data import ImageReportDataset, collate, image_batch
from pipeline.device import loader_options
from pipeline.guards import check_finite_grads
from pipeline.train.distributed import SINGLE, World


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_optimizer(module: torch.nn.Module, lr: float, weight_decay: float,
                    total_steps: int, warmup_steps: int, groups=None):
    """AdamW + linear warmup then cosine decay to 10% of each group's lr.

    `groups`: optional [(parameters, lr), ...] covering the module's parameters (a learning
    rate per module); by default one group at `lr`.
    """
    if groups is None:
        groups = [([p for p in module.parameters() if p.requires_grad], lr)]
    param_groups = [{"params": [p for p in params if p.requires_grad], "lr": group_lr}
                    for params, group_lr in groups]
    covered = sum(len(g["params"]) for g in param_groups)
    expected = sum(1 for p in module.parameters() if p.requires_grad)
    if covered != expected:
        raise ValueError(f"optimizer groups cover {covered} of {expected} trainable tensors")
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    warmup = max(0, min(warmup_steps, total_steps // 2))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer, scheduler,
                   grad_clip: float, step: int) -> float:
    """The one optimizer step of both stages: backward, finite gradients, clip, step,
    schedule. `loss` must already have passed `check_finite_loss`; returns the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # One read of the total norm: the finite-gradient guard and clipping share it
    # (`clip_grad_norm_` is `get_total_norm` then `clip_grads_with_norm_`).
    grad_norm, total = check_finite_grads(model.named_parameters(), step)
    if total is not None:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, total)
    optimizer.step()
    scheduler.step()
    return grad_norm


def file_logger(name: str, path: str | Path) -> logging.Logger:
    """A logger that writes plain text to `path` and to stderr (one handler each)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(fmt)
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(stream)
    return logger


def silent_logger(name: str) -> logging.Logger:
    """A logger that writes nothing: ranks other than 0 (rank 0 speaks for the group)."""
    logger = logging.getLogger(name)
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


class EpochLoaders:
    """Deterministic per-epoch data order that can start part-way into an epoch (resume).

    The order of epoch e is a permutation seeded by (seed, e) alone, cut into global batches
    of `batch_size * world.size`; each rank takes its contiguous share of every global batch,
    so N ranks see the samples a single process with the global batch would, in its order.

    Images are decoded by a DataLoader (`num_workers` processes, kept across epochs; pinned
    memory when the world computes on CUDA) that only follows this order: what a step sees is
    a function of (seed, epoch, step) whatever the number of workers.
    """

    def __init__(self, train_records, val_records, image_size: int, batch_size: int, seed: int,
                 world: World = SINGLE, num_workers: int | None = None):
        self.train = ImageReportDataset(train_records, image_size)
        self.val_dataset = ImageReportDataset(val_records, image_size)
        self.val_records = list(val_records)
        self.batch_size, self.seed, self.image_size = batch_size, seed, image_size
        self.world = world
        self.options = loader_options(world.device, num_workers)
        self._order = _PlannedBatches()
        self._loader: DataLoader | None = None  # built on first use; its workers persist

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world.size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.global_batch_size)

    def epoch(self, epoch: int, skip_batches: int = 0):
        """This rank's batches of `epoch` (its own seeded shuffle), skipping the first
        `skip_batches` global batches.

        Each batch also holds `positions` (its samples' places in the global batch) and
        `weight` (its share of the global batch x world size: scaling the rank's mean loss by
        it makes the ranks' averaged gradients the gradient of the global batch's mean loss,
        also when the last batch does not split evenly). A rank left without a sample gets
        the batch's first one with weight 0, so that it still takes part in the step.
        """
        order = torch.randperm(len(self.train),
                               generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        size = self.global_batch_size
        plan = []  # (dataset indices, positions in the global batch, weight) per step
        for start in range(skip_batches * size, len(order), size):
            chunk = order[start:start + size]
            shares = torch.tensor_split(torch.arange(len(chunk)), self.world.size)
            positions = shares[self.world.rank].tolist()
            weight = len(positions) * self.world.size / len(chunk)
            plan.append(([int(chunk[p]) for p in positions or [0]], positions or [0], weight))
        if not plan:
            return
        self._order.batches = [indices for indices, _, _ in plan]
        for (_, positions, weight), batch in zip(plan, self._train_loader()):
            yield batch | {"positions": positions, "weight": weight}

    def _train_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(self.train, batch_sampler=self._order, collate_fn=collate,
                                      **self.options)
        return self._loader

    def val(self):
        """Validation batches in file order."""
        for start in range(0, len(self.val_dataset), self.batch_size):
            stop = min(start + self.batch_size, len(self.val_dataset))
            yield collate([self.val_dataset[i] for i in range(start, stop)])

    def images(self, records) -> torch.Tensor:
        """A batch of images for records (e.g. to generate reports)."""
        return image_batch(records, self.image_size)


class _PlannedBatches:
    """A DataLoader batch sampler that yields the batches of the epoch being read (set by
    `EpochLoaders.epoch` before each pass; the sampler runs in the main process)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)
