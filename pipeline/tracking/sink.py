"""The metrics sink: training loops call it as `log_metrics(metrics, step)`.

It buffers points and sends them with one `log_batch` call every `flush_every` points (a
synchronous `log_metric` costs ~8 ms on sqlite; a batch of 1000 costs ~0.2 s), and keeps them
while the tracking server is unreachable (`pipeline.tracking.outage`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Mapping

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.outage import call_patiently, is_transient

_log = logging.getLogger("pipeline.tracking")


class MetricsSink:
    """Buffered metric (and tag) logging into one run; call it as `sink(metrics, step)`.

    A flush that cannot reach the tracking server keeps the buffer and training goes on; the
    points go out with a later flush, and `drain()` (at the end of a stage) waits for the
    server up to `outage.patience()` seconds. Every point reaches MLflow exactly once: after a
    failed send, points the server did store before the connection broke are not sent again.
    """

    def __init__(self, run_id: str, flush_every: int = 200, client: MlflowClient | None = None):
        self.run_id = run_id
        self.flush_every = flush_every
        self.client = client or MlflowClient()
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._uncertain = False  # a send failed: the server may hold part of the buffer
        self._retry_at = 0.0  # while unreachable, flushes before this (monotonic) are skipped
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.failed_flushes = 0

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            self._buffer.append(Metric(key, value, now, int(step)))
            self.history.setdefault(key, []).append((int(step), value))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags now, or with a later flush when the server is unreachable.

        Buffered metrics stay buffered: Stage 2 sends them only right after a step checkpoint.
        """
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._attempt(self._send_tags)

    @property
    def pending(self) -> int:
        """Points and tags not yet stored by the server."""
        return len(self._buffer) + len(self._tags)

    def drop(self) -> None:
        """Forget the buffered points without sending them (tags stay)."""
        self._buffer.clear()

    @contextlib.contextmanager
    def around_training(self) -> Iterator[None]:
        """Around a training loop that flushes right after each step checkpoint: when it
        stops, drop what no step checkpoint covers (a resumed run logs those steps again);
        then send the rest, waiting for an unreachable server here, not during training."""
        try:
            yield
        except BaseException:
            self.drop()
            raise
        finally:
            self.drain()

    def flush(self) -> bool:
        """Send what is buffered; False (buffer kept) when the server is unreachable."""
        return self._attempt(self._send)

    def drain(self) -> None:
        """Send everything, waiting for an unreachable server up to `outage.patience()` s."""
        call_patiently(self._send, what="sending buffered metrics")
        self.failed_flushes = 0

    def _attempt(self, send) -> bool:
        # After a failure the next attempts wait 2, 4, ... 30 s, so that training does not pay
        # MLflow's own HTTP retries at every step while the server is away.
        if self.failed_flushes and time.monotonic() < self._retry_at:
            return False
        try:
            send()
        except MlflowException as exc:
            if not is_transient(exc):
                raise
            self._uncertain = True
            self.failed_flushes += 1
            self._retry_at = time.monotonic() + min(2.0 ** self.failed_flushes, 30.0)
            if self.failed_flushes == 1 or self.failed_flushes % 10 == 0:
                _log.warning("tracking server unreachable: %d metric points and %d tags kept, "
                             "sent when it answers again (%s)", len(self._buffer),
                             len(self._tags), " ".join(str(exc).split())[:200])
            return False
        if self.failed_flushes:
            _log.warning("tracking server reachable again")
            self.failed_flushes = 0
        return True

    def _send(self) -> None:
        if self._uncertain and self._buffer:
            self._drop_stored()
        while self._buffer:
            chunk = self._buffer[:1000]  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            self._buffer = self._buffer[1000:]
        self._uncertain = False
        self._send_tags()

    def _send_tags(self) -> None:
        if not self._tags:
            return
        tags = dict(self._tags)
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()],
                              synchronous=True)
        for key, value in tags.items():
            if self._tags.get(key) == value:  # unless set again meanwhile
                del self._tags[key]

    def _drop_stored(self) -> None:
        """Remove buffered points the server already holds (same key, step and timestamp)."""
        stored = set()
        for key in {m.key for m in self._buffer}:
            stored.update((key, m.step, m.timestamp)
                          for m in self.client.get_metric_history(self.run_id, key))
        self._buffer = [m for m in self._buffer if (m.key, m.step, m.timestamp) not in stored]
