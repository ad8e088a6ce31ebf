"""Riding out a tracking server that goes away for a while (a restart, a network blip).

MLflow's HTTP client retries each request itself (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, default 7,
with exponential backoff `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`, default 2: about four minutes)
and then raises an `MlflowException` whose context is the `requests` error. Here such a
failure is recognised as transient: the metrics sink keeps its points and sends them later,
and run-level calls (tags, params, artifacts) are retried until `patience()` seconds have
passed, so an outage shorter than that never fails a run. Anything else (a refused value, an
unknown run) is raised at once.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, TypeVar

from mlflow.exceptions import MlflowException

PATIENCE_ENV = "REPORT_VLM_TRACKING_PATIENCE_S"  # how long to retry a transient failure
DEFAULT_PATIENCE_S = 900.0
_log = logging.getLogger("pipeline.tracking")
T = TypeVar("T")


def patience() -> float:
    """Seconds a run keeps retrying an unreachable tracking server before it gives up."""
    try:
        return max(0.0, float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE_S)))
    except ValueError:
        return DEFAULT_PATIENCE_S


def is_transient(exc: BaseException) -> bool:
    """True for a failure to reach the server (refused, reset, timed out, 5xx after retries)."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, requests.exceptions.InvalidURL):
            return False
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        # MLflow wraps the requests error without `from`: it is the implicit context.
        exc = exc.__cause__ or exc.__context__
    return False


def call_patiently(fn: Callable[..., T], *args, what: str = "tracking call", **kwargs) -> T:
    """`fn(*args, **kwargs)`, retried while the tracking server is unreachable.

    Only for calls that are safe to repeat (tags, params with the same value, artifacts
    uploaded to the same path). Raises the last error after `patience()` seconds, or after one
    try while an interrupt unwinds: a second Ctrl-C is shielded then and must not wait.
    """
    unwinding = isinstance(sys.exc_info()[1], KeyboardInterrupt)
    deadline = time.monotonic() + (0.0 if unwinding else patience())
    delay, warned = 1.0, False
    while True:
        try:
            result = fn(*args, **kwargs)
        except MlflowException as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                _log.warning("tracking server unreachable (%s): retrying for up to %.0f s",
                             what, deadline - time.monotonic())
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
            continue
        if warned:
            _log.warning("tracking server reachable again (%s)", what)
        return result


def call_or_none(fn: Callable[..., T], *args, what: str = "tracking call", **kwargs) -> T | None:
    """`call_patiently(fn, ...)`, or None when MLflow answers that the thing does not exist.

    Only RESOURCE_DOES_NOT_EXIST is an absence: an unreachable server or any other error is
    raised, never read as "nothing there".
    """
    try:
        return call_patiently(fn, *args, what=what, **kwargs)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
