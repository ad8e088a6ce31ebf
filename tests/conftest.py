"""Shared fixtures: every test gets a temporary MLflow store; nothing touches the user's."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store + artifact root under tmp_path, set as the default."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
