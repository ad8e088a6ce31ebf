"""SIGINT / SIGTERM as KeyboardInterrupt, held back while a training step is half applied.

A stop that lands between `optimizer.step()` and the step counter, or between a metric and
its CSV row, would leave a checkpoint saved on interrupt out of step with what was logged.
Training loops wrap each step (and each epoch's end) in `atomic()`: a stop signal that
arrives inside is remembered and raised when the block ends, so the loop saves a consistent
checkpoint at a step boundary. Outside `atomic()` the signal raises at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_depth = 0
_pending: str | None = None


def request_stop(signum: int) -> None:
    """Called from a signal handler: raise KeyboardInterrupt now, or at the end of `atomic()`."""
    global _pending
    message = f"signal {signum}"
    if _depth:
        _pending = message
        print(f"{signal.Signals(signum).name} received: finishing the current step, then "
              "saving a checkpoint", file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt(message)


def pending() -> bool:
    """Whether a stop arrived inside the current `atomic()` block."""
    return _pending is not None


@contextlib.contextmanager
def atomic() -> Iterator[None]:
    """Hold a stop signal back until the block has run to its end (then raise it)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        message, _pending = _pending, None
        raise KeyboardInterrupt(message)


def reset() -> None:
    """Forget a held-back stop (a new run in the same process starts clean)."""
    global _depth, _pending
    _depth, _pending = 0, None
