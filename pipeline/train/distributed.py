"""Data parallelism over torch.distributed (one process per rank under torchrun).

torchrun exports RANK, WORLD_SIZE and LOCAL_RANK; `join_world` reads them, resolves this
rank's device (`pipeline.device`: LOCAL_RANK's GPU under CUDA) and opens the process group
(NCCL for CUDA tensors, gloo on the CPU). With world size 1 nothing is opened and every
method below is a no-op or a plain local computation, so a single process runs exactly as
before.
"""
from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline import interrupts
from pipeline.device import CPU, is_cuda, prepare, process_group_backend, resolve_device
from pipeline.guards import GuardError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among `size` data-parallel ranks, and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that tracks, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` in DistributedDataParallel when there are several ranks.

        Unused parameters are allowed: the `findings` objective never runs the bridge.
        """
        if not self.distributed:
            return module
        device_ids = [self.device.index] if is_cuda(self.device) else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def barrier(self) -> None:
        """Wait for every rank (e.g. while rank 0 validates or writes a checkpoint)."""
        if self.distributed:
            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """`work()` on rank 0, then on the other ranks: rank 0 writes a shared cache (the
        generated dataset, the converted LLM) that the others then only read."""
        if self.is_main:
            result = work()
        self.barrier()
        if not self.is_main:
            result = work()
        return result

    def mean(self, means: Sequence[tuple[float, int]],
             error: Exception | None = None) -> list[tuple[float, int]]:
        """Each (this rank's mean, over its count of items) as (the mean over the global
        batch, the global count); when a guard fired on any rank, raise on every rank."""
        if not self.distributed:
            if error is not None:
                raise error
            return list(means)
        totals = torch.tensor([x for value, count in means for x in (value * count, count)]
                              + [float(error is not None)], dtype=torch.float64)
        dist.all_reduce(totals)
        if totals[-1] > 0:
            self._raise_first(error)
        return [(float(totals[2 * i] / totals[2 * i + 1]) if totals[2 * i + 1] else 0.0,
                 int(totals[2 * i + 1])) for i in range(len(means))]

    def agree(self, error: Exception | None) -> None:
        """Raise on every rank when a guard fired on any rank (`error`: this rank's, or None).

        One process: `error` itself. Several: rank 0 raises a GuardError naming the rank
        and its message; the other ranks raise it silently (`reported_by_rank0`)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        flag = torch.tensor([float(error is not None)])
        dist.all_reduce(flag)
        if flag.item() > 0:
            self._raise_first(error)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer). A host
        tensor, over gloo as `agree` and `mean` send theirs (the group opens gloo for the CPU
        beside NCCL): asking costs the GPU's queue nothing."""
        if not self.distributed:
            return flag
        total = torch.tensor([float(flag)])
        dist.all_reduce(total)
        return bool(total.item() > 0)

    def checked(self, check: Callable[[], T], errors: tuple = (GuardError,)) -> T:
        """`check()` on every rank; one of `errors` raised on any rank stops every rank."""
        result, error = None, None
        try:
            result = check()
        except errors as exc:
            error = exc
        self.agree(error)
        return result

    def _raise_first(self, error: Exception | None) -> None:
        messages: list = [None] * self.size
        mine = None if error is None else str(error) if isinstance(error, GuardError) \
            else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine)
        rank, message = next((r, m) for r, m in enumerate(messages) if m)
        group_error = GuardError(f"{message} (on rank {rank} of {self.size}; every rank stopped)")
        group_error.reported_by_rank0 = not self.is_main
        group_error.raised_on_every_rank = True
        raise group_error from error

    def part_after(self, error: BaseException) -> None:
        """After `error` ended this rank's job: when every rank raised it (a group error),
        wait until every rank has ended its job, rank 0 included (it saves, ends its run
        FAILED and reports). torchrun stops the other ranks as soon as one exits with an
        error, so a rank that left first would cut rank 0's save and report short.
        Rank 0 then ignores stop signals: those torchrun sends while it exits."""
        if not (self.distributed and getattr(error, "raised_on_every_rank", False)):
            return
        if self.is_main:
            for signum in interrupts.STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        dist.barrier()


SINGLE = World()


def join_world(device: str = "auto", timeout: timedelta | None = None) -> World:
    """The world torchrun started this process in (opens the process group, its collectives
    waiting up to `timeout`), or a single process; either computes on the device `device`
    resolves to for this LOCAL_RANK.

    `timeout` bounds every collective, the final barrier included (gloo's default: 30 min).

    On ranks other than 0 (which open no run, so get no stop handler from it), SIGINT and
    SIGTERM wait for the current step too: a rank that stopped mid-step would fail rank 0's
    step instead of letting it save and end its run KILLED.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    prepare(resolved)
    if size <= 1:
        return World(device=resolved)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(resolved, size),
                                **({"timeout": timeout} if timeout else {}))
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), device=resolved)
    if not world.is_main:
        for signum in interrupts.STOP_SIGNALS:
            signal.signal(signum, lambda received, _: interrupts.request_stop(received))
    return world


def leave_world(world: World) -> None:
    """Close the process group `join_world` opened.

    Unreachable objects are collected first: a DistributedDataParallel module held only by a
    reference cycle (a trainer and its callbacks) would otherwise be freed at interpreter exit,
    after its group closed, where gloo's threads abort the rank (SIGABRT, "terminate called
    without an active exception") and torchrun then fails the whole job."""
    if world.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
