"""Shared fixtures: every test gets a temporary MLflow store; nothing touches the user's."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests: CI is reproducible (derandomised, no example database replaying an old
# failure), and a failing example is printed with the blob that replays it. `make property`
# runs them with fresh randomness (HYPOTHESIS_PROFILE=fresh).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fresh", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests never send usage telemetry anywhere.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

# `make test` runs the suite in two pytest-xdist workers, one per core: each computes on one
# thread (two each would oversubscribe the cores). A plain `pytest` run keeps both.
# The programs tests start (training CLIs, servers) inherit one thread per worker as well.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store + artifact root under tmp_path, set as the default."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; it must not leak between stores.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    # The fluent API caches the active experiment id; it belongs to the store just removed.
    mlflow.tracking.fluent._active_experiment_id = None
    # set_experiment exported it during the test (delenv above records nothing to undo when
    # it was absent); a later subprocess copying os.environ must not inherit it.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def grounded_llm(tmp_path_factory):
    """A tiny LM that writes each grounded-data report after its findings prompt (HF folder)."""
    from tests.grounded_data import pretrained_tiny_llm

    return pretrained_tiny_llm(tmp_path_factory.mktemp("grounded_llm"))
