"""The pipeline against a shared tracking server: PostgreSQL + `mlflow server` on 127.0.0.1.

`scripts/team_server.sh` (what `make server` runs) starts both on free ports in a temporary
folder. Two Stage 1 runs started at once against the fresh server (both create the experiment
and the synthetic data), then `main` on the tiny profile, all through
`MLFLOW_TRACKING_URI=http://...`; the runs, aliases and artifacts are then read back through
the server. `main` trains on the tiny grounded dataset with the tiny LM that follows a
findings prompt (tests/grounded_data.py): the tiny profile's random LM can never pass the
champion gate, and `report-vlm@champion` is part of what is checked.
Skipped with the reason when PostgreSQL or psycopg is missing (`make postgres` installs it).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.grounded_data import pretrained_tiny_llm, write_dataset
from tests.servers import free_port
from tests.test_main import CHILDREN, _remove_local_outputs, _tail

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "team_server.sh"


def _missing() -> str | None:
    if shutil.which("initdb") is None and not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "PostgreSQL is not installed (`make postgres` installs Debian's package as root)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs the 'postgres' user to run PostgreSQL"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install -e '.[server]')"
    return None


@pytest.fixture()
def team_server():
    """`scripts/team_server.sh start` on free ports; yields (URL, env); stops and removes all."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp_path: as root, PostgreSQL runs as `postgres`, who must reach it.
    folder = tempfile.mkdtemp(prefix="team-server-", dir="/tmp")
    os.chmod(folder, 0o755)
    port = free_port()
    env = {**os.environ, "TEAM_SERVER_DIR": folder, "MLFLOW_PORT": str(port),
           "PG_PORT": str(free_port()), "MLFLOW_WORKERS": "2", "PYTHON": sys.executable}
    try:
        started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True,
                                 text=True, timeout=300)
        assert started.returncode == 0, _tail(started)
        url = f"http://127.0.0.1:{port}"
        assert f"export MLFLOW_TRACKING_URI={url}" in started.stdout, started.stdout
        assert "stop it:" in started.stdout
        yield url
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    assert stopped.returncode == 0, _tail(stopped)
    assert not Path(folder).exists()


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=url, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    return env


def _stage_runs(client: MlflowClient, stage: str) -> list:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, f"tags.`pipeline.stage` = '{stage}'")


def test_pipeline_on_a_postgresql_tracking_server(team_server, tmp_path):
    url, client = team_server, MlflowClient(tracking_uri=team_server)
    # Two Stage 1 runs at once, from a fresh folder (no data yet) against a fresh server.
    work = tmp_path / "work"
    work.mkdir()
    pair = [subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny"],
                             cwd=work, env=_env(url), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in pair]
    for proc, (out, err) in zip(pair, outputs):
        assert proc.returncode == 0, f"rc={proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    concurrent = _stage_runs(client, "stage1")
    assert [r.info.status for r in concurrent] == ["FINISHED", "FINISHED"]

    data = write_dataset(tmp_path / "data", informative=True, n_eval=4)
    llm = pretrained_tiny_llm(tmp_path / "llm")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "steps.main", "--profile", "tiny", "--data", str(data),
             "--llm", str(llm), "--stage2_lr", "1e-2"],
            cwd=ROOT, env=_env(url), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, _tail(proc)
        (parent,) = _stage_runs(client, "main")
        children = {}
        for stage in CHILDREN:
            runs = [r for r in _stage_runs(client, stage)
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
            assert len(runs) == 1, (stage, len(runs))
            children[stage] = runs[0]
        for stage, run in {"main": parent, **children}.items():
            assert run.info.status == "FINISHED", stage

        vision = client.get_model_version_by_alias("vision-bridge", "stage2-ready")
        assert vision.tags["source_run"] == children["stage1"].info.run_id
        champion = client.get_model_version_by_alias("report-vlm", "champion")
        assert champion.tags["source_run"] == children["stage2"].info.run_id
        assert children["evaluate"].data.tags["champion.verdict"] == "approved"
        # Artifacts live on the server's artifact store and come back through it.
        assert children["stage2"].info.artifact_uri.startswith("mlflow-artifacts:")
        csv = client.download_artifacts(children["stage2"].info.run_id,
                                        "stage2_train_log.csv", str(tmp_path))
        assert Path(csv).read_text().startswith("step,epoch,caption_loss")
        assert f"see them: open {url}" in proc.stdout, proc.stdout[-2000:]
    finally:
        _remove_local_outputs(client)
