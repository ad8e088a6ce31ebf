"""MetricsSink against a tracking client that goes away: the buffer is kept, every point
arrives exactly once (also when the server stored a batch but the answer was lost), and
failures that are not about reaching the server are raised at once."""
from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException

from pipeline.tracking import outage
from pipeline.tracking.sink import MetricsSink


def _unreachable() -> MlflowException:
    try:
        raise requests.exceptions.ConnectionError("Connection refused")
    except requests.exceptions.ConnectionError as exc:
        try:  # how MLflow's http_request wraps it: no `from`, the context holds it
            raise MlflowException(f"API request failed with exception {exc}")
        except MlflowException as wrapped:
            return wrapped


class FlakyClient:
    """Stores log_batch points like a server; `down` fails calls, `lose_answer` stores the
    batch and then fails (the connection broke after the commit)."""

    def __init__(self):
        self.points, self.tags = [], {}
        self.down = self.lose_answer = False

    def log_batch(self, run_id, metrics=(), tags=(), synchronous=True):
        if self.down:
            raise _unreachable()
        self.points.extend(metrics)
        self.tags.update({t.key: t.value for t in tags})
        if self.lose_answer:
            self.lose_answer = False
            raise _unreachable()

    def get_metric_history(self, run_id, key):
        if self.down:
            raise _unreachable()
        return [m for m in self.points if m.key == key]


def test_unreachable_server_keeps_the_buffer_and_sends_each_point_once(monkeypatch):
    client = FlakyClient()
    sink = MetricsSink("run", flush_every=10**9, client=client)
    sink({"train_loss": 1.0}, 1)
    assert sink.flush() and len(client.points) == 1

    client.down = True
    sink({"train_loss": 0.9}, 2)
    sink.set_tags({"stage2.curve_verdict": "epoch 1: healthy"})
    assert sink.flush() is False and sink.pending == 2
    sink({"train_loss": 0.8}, 3)
    assert sink.flush() is False  # backing off: not even tried
    client.down = False
    client.lose_answer = True  # stored, but the answer never came back
    monkeypatch.setattr(sink, "_retry_at", 0.0)
    assert sink.flush() is False
    monkeypatch.setattr(sink, "_retry_at", 0.0)
    assert sink.flush() is True and sink.pending == 0
    assert sorted(m.step for m in client.points) == [1, 2, 3]
    assert client.tags == {"stage2.curve_verdict": "epoch 1: healthy"}


def test_drain_waits_for_the_server_within_patience(monkeypatch):
    client = FlakyClient()
    sink = MetricsSink("run", client=client)
    client.down = True
    sink({"train_loss": 1.0}, 1)
    calls = []

    def come_back(seconds):
        calls.append(seconds)
        client.down = len(calls) < 3

    monkeypatch.setattr(outage.time, "sleep", come_back)
    sink.drain()
    assert [m.step for m in client.points] == [1] and len(calls) == 3

    monkeypatch.setenv(outage.PATIENCE_ENV, "0")
    client.down = True
    sink({"train_loss": 0.5}, 2)
    with pytest.raises(MlflowException):
        sink.drain()


def test_a_refused_value_is_not_mistaken_for_an_outage():
    class Refusing(FlakyClient):
        def log_batch(self, *args, **kwargs):
            raise MlflowException("Changing param values is not allowed",
                                  error_code="INVALID_PARAMETER_VALUE")

    sink = MetricsSink("run", client=Refusing())
    sink({"train_loss": 1.0}, 1)
    with pytest.raises(MlflowException, match="not allowed"):
        sink.flush()
    assert not outage.is_transient(MlflowException("no such run"))
    assert outage.is_transient(_unreachable())


def test_an_interrupted_run_does_not_wait_for_the_server(monkeypatch):
    client = FlakyClient()
    sink = MetricsSink("run", client=client)
    client.down = True
    sink({"train_loss": 1.0}, 1)
    monkeypatch.setattr(outage.time, "sleep", lambda s: pytest.fail("waited while interrupted"))
    with pytest.raises(MlflowException):
        try:
            raise KeyboardInterrupt
        finally:
            sink.drain()


def test_tags_go_out_at_once_and_leave_buffered_metrics_buffered():
    """Stage 2 sends metrics only right after a step checkpoint (the resume invariant)."""
    client = FlakyClient()
    sink = MetricsSink("run", flush_every=10**9, client=client)
    sink({"train_loss": 1.0}, 1)
    sink.set_tags({"stage2.curve_verdict": "epoch 1: healthy"})
    assert client.tags == {"stage2.curve_verdict": "epoch 1: healthy"}
    assert client.points == [] and sink.pending == 1
