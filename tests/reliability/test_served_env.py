"""A registered `report-vlm` served from a fresh virtualenv built only from the requirements it
declares: nothing of this project's environment, and the project not importable. A package the
served code imports but the model does not declare fails here as it would on a serving host.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
from click.testing import CliRunner

from tests.grounded_data import write_dataset
from tests.servers import free_port, stop_process_group
from tests.test_pyfunc_portable import _dicom_film

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_the_model_serves_from_a_virtualenv_of_its_own_requirements(mlflow_store, tmp_path):
    from steps import stage2

    annotation = write_dataset(tmp_path / "data", informative=True, n_train=4, n_eval=2)
    trained = CliRunner().invoke(stage2.main, ["--profile", "tiny", "--init", "scratch",
                                               "--data", str(annotation), "--epochs", "1"],
                                 catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    elsewhere = tmp_path / "elsewhere"
    copy = Path(mlflow.artifacts.download_artifacts("models:/report-vlm@candidate",
                                                    dst_path=str(elsewhere / "model")))
    venv = elsewhere / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r",
                                str(copy / "requirements.txt")], capture_output=True, text=True,
                               timeout=1200)
    assert installed.returncode == 0, installed.stderr[-3000:]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    log_path = elsewhere / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(venv / "bin" / "mlflow"), "models", "serve", "-m",
                                 str(copy), "--env-manager", "local", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=elsewhere, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        films = [sorted((tmp_path / "data").glob("*.png"))[0],
                 _dicom_film(tmp_path / "film.dcm")]
        rows = [{"image": base64.b64encode(f.read_bytes()).decode("ascii")} for f in films]
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": rows},
                               timeout=300)
        assert answer.status_code == 200, answer.text[-2000:]
        reports = answer.json()["predictions"]
        assert len(reports) == 2 and all(isinstance(r, str) for r in reports), reports
    finally:
        stop_process_group(proc)
