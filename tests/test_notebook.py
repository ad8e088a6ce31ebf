"""The comparison notebook runs headless, top to bottom, on a fixture store and an empty one."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.fixtures_runs import populate

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"


@pytest.fixture()
def kernel_env(monkeypatch):
    """Environment for the kernel process, which inherits ours.

    `kernel_name="python3"` needs no installed kernelspec: jupyter_client serves ipykernel's
    built-in spec and launches it with this interpreter (sys.executable), i.e. the venv.
    """
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebook switches to inline itself
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing may leave 127.0.0.1
    return monkeypatch


def _execute(uri: str, monkeypatch) -> list[dict]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # inherited by the kernel process
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _text(outputs: list[dict]) -> str:
    parts = []
    for out in outputs:
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(parts)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_fixture_store(tmp_path, kernel_env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    populate(uri, tmp_path / "artifacts")
    outputs = _execute(uri, kernel_env)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 2
    text = _text(outputs)
    assert "rejected" in text and "approved" in text
    assert "stage1-l2proxy-lr1e-4" in text and "stage2-in-band" in text
    assert "no stage2 runs yet" not in text


def test_notebook_runs_on_empty_store(tmp_path, kernel_env):
    outputs = _execute(f"sqlite:///{tmp_path / 'empty.db'}", kernel_env)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = _text(outputs)
    assert "no stage1 runs yet" in text and "no stage2 runs yet" in text
    assert "no evaluate runs yet" in text
