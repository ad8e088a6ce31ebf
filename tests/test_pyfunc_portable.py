"""A registered `report-vlm` version carries its code and pinned requirements: a copy loaded
from another folder, where this project is not importable, still writes reports."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from steps import stage2
from tests.grounded_data import write_dataset

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter elsewhere: the project is taken off the import path first (the
# venv's editable install would otherwise find this checkout from any folder).
_LOAD_ELSEWHERE = textwrap.dedent("""
    import importlib.util, json, sys

    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", sys.argv[3])]
    assert importlib.util.find_spec("pipeline") is None, "the project is still importable"

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(sys.argv[1])
    reports = model.predict([{"image": sys.argv[2]}])
    print("REPORTS " + json.dumps(list(reports)))
""")


@pytest.fixture()
def registered(mlflow_store, tmp_path):
    """One tiny Stage 2 run, registered as `report-vlm@candidate`; an image to send it."""
    data = write_dataset(tmp_path / "data", informative=True, n_train=4, n_eval=2)
    result = CliRunner().invoke(stage2.main, ["--profile", "tiny", "--init", "scratch",
                                              "--data", str(data), "--epochs", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return sorted((tmp_path / "data").glob("*.png"))[0]


def test_registered_report_vlm_loads_and_answers_from_another_folder(registered, tmp_path):
    copy = Path(mlflow.artifacts.download_artifacts("models:/report-vlm@candidate",
                                                    dst_path=str(tmp_path / "elsewhere" / "m")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    image = base64.b64encode(registered.read_bytes()).decode("ascii")
    done = subprocess.run([sys.executable, "-c", _LOAD_ELSEWHERE, str(copy), image, str(ROOT)],
                          cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("REPORTS ")]
    reports = json.loads(line.removeprefix("REPORTS "))
    assert len(reports) == 1 and isinstance(reports[0], str)

    requirements = (copy / "requirements.txt").read_text().split()
    unpinned = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=]+", r)]
    assert not unpinned, f"unpinned requirements: {unpinned}"
