"""SIGINT / SIGTERM as KeyboardInterrupt, held back while a training step is half applied.

A stop that lands between `optimizer.step()` and the step counter, or between a metric and
its CSV row, would leave a checkpoint saved on interrupt out of step with what was logged.
Training loops wrap each step (and each epoch's end) in `atomic()`: a stop signal that
arrives inside is remembered and raised when the block ends, so the loop saves a consistent
checkpoint at a step boundary. Outside `atomic()` the signal raises at once.

`stop_signals_raise()` installs the handlers for the length of a run (`pipeline.tracking.runs`
opens every run inside it); nothing is installed on import.
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


def take() -> str | None:
    """The held-back stop's message, forgotten (None when there is none): for a caller that
    raises it itself (ranks that agree on a stop, `TrainLoop.fit`)."""
    global _pending
    message, _pending = _pending, None
    return message


def reset() -> None:
    """Forget a held-back stop (a new run in the same process starts clean)."""
    global _depth, _pending
    _depth, _pending = 0, None


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (held back inside `atomic()`) while the block runs.

    After the first one, further SIGINT/SIGTERM are ignored: under `mlflow run`, Ctrl-C reaches
    the whole process group and `mlflow run` then sends SIGTERM to cancel its child at once; a
    second interrupt must not cut the save or the KILLED status short, nor turn exit code 130
    into death by signal. The previous handlers come back when the block ends, except when it
    ends by an interrupt: the program is then on its way out and keeps the shield.
    """
    reset()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        _restore(previous)
        raise
    else:
        _restore(previous)


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    for stop in STOP_SIGNALS:  # shield the save and the run's end from a second interrupt
        signal.signal(stop, signal.SIG_IGN)
    request_stop(signum)  # raises now, or when the current training step ends
