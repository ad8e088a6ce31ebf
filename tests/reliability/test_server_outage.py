"""A Stage 2 run survives its tracking server going away for 30 s mid-training.

`mlflow server` (sqlite backend) is stopped while a tiny Stage 2 run trains and started again
on the same port 30 s later. The run must finish, keep training while the server is away,
and leave in MLflow every step of `train_loss` exactly once, as `stage2_train_log.csv` (the
source of truth) lists them. MLflow's own HTTP retries are set short here
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`, backoff factor 1, timeout 10 s: a failed call gives up
after a few seconds), so that what rides out the outage is the project's code.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.servers import free_port, healthy, start_mlflow_server, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = 30
EPOCHS = 300  # 6 steps an epoch on the tiny profile: training outlasts the outage
STEPS_BEFORE_OUTAGE = 40


def _csv_rows(out_dir: Path) -> list[dict]:
    found = sorted(out_dir.glob("*/stage2_train_log.csv"))
    if not found:
        return []
    with open(found[0], newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row.get("seconds")]  # complete rows


def _wait_for_rows(out_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> None:
    started = time.monotonic()
    while len(_csv_rows(out_dir)) < n:
        assert proc.poll() is None, f"stage2 exited early with {proc.returncode}"
        assert time.monotonic() - started < timeout, f"fewer than {n} steps in {timeout} s"
        time.sleep(0.2)


def test_stage2_survives_the_tracking_server_going_away(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    backend, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    server_log, out_dir = tmp_path / "server.log", tmp_path / "outputs"
    server = start_mlflow_server(backend, artifacts, port, server_log)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=base, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
               MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    stdout, stderr = (tmp_path / "stage2.out").open("w"), (tmp_path / "stage2.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "steps.stage2", "--profile", "tiny", "--from_scratch",
         "--epochs", str(EPOCHS), "--output_dir", str(out_dir)],
        cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
    try:
        _wait_for_rows(out_dir, proc, STEPS_BEFORE_OUTAGE)
        stop_process_group(server)
        down_at, steps_at_stop = time.monotonic(), len(_csv_rows(out_dir))
        assert not healthy(base)
        time.sleep(OUTAGE_S)
        steps_while_down = len(_csv_rows(out_dir)) - steps_at_stop
        server = start_mlflow_server(backend, artifacts, port, server_log)
        outage = time.monotonic() - down_at
        steps_at_restart = len(_csv_rows(out_dir))
        returncode = proc.wait(timeout=900)
        stdout.close(), stderr.close()
        err = (tmp_path / "stage2.err").read_text()
        print(f"tracking server unreachable for {outage:.1f} s ({OUTAGE_S} s stopped + "
              f"restart); {steps_while_down} steps trained meanwhile; {steps_at_restart} of "
              f"{EPOCHS * 6} steps done when it came back")
        assert returncode == 0, err[-4000:]
        assert "tracking server unreachable" in err, "the run never noticed the outage"
        assert steps_while_down > 0, "training stalled while the server was away"
        _check_logged_once(MlflowClient(tracking_uri=base), out_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close(), stderr.close()
        stop_process_group(server)


def _check_logged_once(client: MlflowClient, out_dir: Path) -> None:
    """MLflow holds each CSV step's train_loss exactly once, with the CSV's value."""
    rows = _csv_rows(out_dir)
    assert len(rows) == EPOCHS * 6
    (run_dir,) = {p.parent for p in out_dir.glob("*/stage2_train_log.csv")}
    run = client.get_run(run_dir.name)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    logged = sorted((m.step, m.value) for m in history)
    assert len(logged) == len({step for step, _ in logged}), "a step was logged twice"
    assert [step for step, _ in logged] == [int(r["step"]) for r in rows]
    for (step, value), row in zip(logged, rows):
        assert value == pytest.approx(float(row["caption_loss"]), abs=1e-5), step
    assert "final_train_loss" in run.data.metrics
    assert run.data.tags["stage2.curve_verdict"].startswith(f"epoch {EPOCHS}:")
