"""Guards: pure checks called at a seam, raising `GuardError` with the offending numbers.

Each guard also returns the statistic it looked at, so callers can log it as a metric.
A guard never drops or zeroes a sample: it stops the run and says why.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

IGNORE_INDEX = -100
LOW_LOSS_WARNING = ("WARNING: loss {loss:.2e} < {threshold:g} at epoch {epoch}: the features are "
                    "likely collapsed. Do not initialise Stage 2 from this run; use --from_scratch.")


class GuardError(RuntimeError):
    """A guard fired; the message names the step, parameter or numbers involved."""


def check_finite_loss(loss: torch.Tensor, step: int) -> float:
    """Raise when the loss is NaN or infinite; return it as a float."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise GuardError(f"non-finite loss {value} at step {step}")
    return value


def check_finite_grads(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                       step: int) -> float:
    """Raise naming the parameters whose gradient is not finite; return the global grad norm."""
    bad, total = [], 0.0
    for name, param in named_parameters:
        if param.grad is None:
            continue
        norm = float(param.grad.detach().norm())
        if not math.isfinite(norm):
            bad.append(name)
        else:
            total += norm * norm
    if bad:
        raise GuardError(f"non-finite gradient at step {step} in {len(bad)} parameter(s): "
                         f"{', '.join(bad[:10])}")
    return math.sqrt(total)


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
