"""Guards: pure checks called at a seam, raising `GuardError` with the offending numbers.

Each guard also returns the statistic it looked at, so callers can log it as a metric.
A guard never drops or zeroes a sample: it stops the run and says why.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from pipeline.device import STORAGE, host_values

IGNORE_INDEX = -100
LOW_LOSS_WARNING = ("WARNING: loss {loss:.2e} < {threshold:g} at epoch {epoch}: the features are "
                    "likely collapsed. Do not initialise Stage 2 from this run; use --from_scratch.")


class GuardError(RuntimeError):
    """A guard fired; the message names the step, parameter or numbers involved."""


def check_finite_loss(loss: torch.Tensor | float, step: int) -> float:
    """Raise when the loss is NaN or infinite; return it as a float (`loss`: a tensor, or its
    value already read with `host_values`)."""
    value = loss if isinstance(loss, float) else host_values(loss)[0]
    if not math.isfinite(value):
        raise GuardError(f"non-finite loss {value} at step {step}")
    return value


def check_finite_grads(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                       step: int) -> tuple[float, torch.Tensor | None]:
    """Raise naming the parameters whose gradient is not finite; return the global grad norm
    (as a float, and as the tensor `clip_grads_with_norm_` takes; None without gradients).

    One fused norm (`torch._foreach_norm`, the total as `clip_grad_norm_` computes it) and one
    read of the total: a NaN or infinite entry anywhere makes the total non-finite, and only
    then are the parameters' own norms read to name them.
    """
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return 0.0, None
    grads = [grad.detach() for _, grad in named]
    total = torch.nn.utils.get_total_norm(grads)
    (value,) = host_values(total)
    if not math.isfinite(value):
        finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(grads)])
        bad = [name for (name, _), ok in zip(named, finite.to(STORAGE).tolist()) if not ok]
        raise GuardError(f"non-finite gradient at step {step} in {len(bad)} parameter(s): "
                         f"{', '.join(bad[:10])}")
    return value, total


def low_loss_warning(epoch_loss: float, epoch: int, threshold: float = 1e-3) -> str | None:
    """The collapse warning text when an epoch's mean loss is below `threshold`, else None."""
    if epoch_loss < threshold:
        return LOW_LOSS_WARNING.format(loss=epoch_loss, threshold=threshold, epoch=epoch)
    return None


def check_optimizer_excludes(optimizer: torch.optim.Optimizer,
                             frozen: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
    """Raise naming any frozen-module parameter that the optimizer would update."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    leaked = [name for name, p in frozen if id(p) in in_optimizer]
    if leaked:
        raise GuardError(f"{len(leaked)} LLM parameter(s) are in the optimizer: "
                         f"{', '.join(leaked[:10])}")
    return len(in_optimizer)


def check_label_mask(labels: torch.Tensor, report_mask: torch.Tensor) -> int:
    """Supervised positions (labels != -100) must be exactly `report_mask`, >= 1 per sample.

    `report_mask` (B, L) is True on report and EOS positions, derived from the layout by
    position, never by token id. Returns the number of supervised positions.
    """
    supervised = labels != IGNORE_INDEX
    if supervised.shape != report_mask.shape:
        raise GuardError(f"labels {tuple(supervised.shape)} and layout "
                         f"{tuple(report_mask.shape)} differ in shape")
    extra = supervised & ~report_mask
    missing = report_mask & ~supervised
    if extra.any():
        rows = extra.any(dim=1).nonzero().flatten().tolist()
        raise GuardError(f"label masking broken: {int(extra.sum())} visual/prompt/padding "
                         f"position(s) are supervised (samples {rows[:10]})")
    if missing.any():
        rows = missing.any(dim=1).nonzero().flatten().tolist()
        raise GuardError(f"label masking broken: {int(missing.sum())} report/EOS position(s) "
                         f"are masked out (samples {rows[:10]})")
    empty = (supervised.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise GuardError(f"samples {empty[:10]} have no supervised position")
    return int(supervised.sum())
