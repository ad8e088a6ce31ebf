"""Stage 1 and Stage 2 killed (SIGKILL) or stopped (SIGTERM) at 10 seeded random points each,
resumed each time.

The chain of interrupted runs must end where one uninterrupted run ends: every step once in
the CSV and in MLflow, the same per-step losses, and bitwise the same final weights (CPU,
same seed). Tiny profile (Stage 2 with the tiny random LM): 12 studies, batch 2, 4 epochs =
24 steps, a step checkpoint every 4 steps.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 4, 24
# In-process tests leave MLflow's experiment/run variables in os.environ; a child must not
# look for an experiment of another store.
_INHERITED = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def _env(tracking_uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    return {**env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
N_POINTS = 10


# stage -> (extra arguments, CSV name, final checkpoint, loss column, epoch metrics)
STAGES = {
    "stage1": ([], "stage1_train_log.csv", "vision_bridge_final", "train_loss",
               ("val_loss", "epoch_train_loss")),
    "stage2": (["--init", "scratch", "--llm", "tiny-random"], "stage2_train_log.csv",
               "vision_bridge_vlm_final", "caption_loss",
               ("val_loss", "val_grounding_gap", "epoch_train_loss")),
}


def _command(out: Path, resume: bool, stage: str = "stage2") -> list[str]:
    return [sys.executable, "-m", f"steps.{stage}", "--profile", "tiny", *STAGES[stage][0],
            "--epochs", str(EPOCHS), "--output_dir", str(out),
            *(["--resume", "auto"] if resume else [])]


def _csv(out: Path, stage: str) -> Path | None:
    """The newest run folder's CSV (killed before its first step checkpoint, a run cannot be
    resumed and `--resume auto` starts a new one)."""
    found = list(out.glob(f"*/{STAGES[stage][1]}"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _rows(out: Path, stage: str) -> int:
    path = _csv(out, stage)
    try:
        return len(pd.read_csv(path)) if path else 0
    except (pd.errors.EmptyDataError, pd.errors.ParserError):  # caught mid-write
        return 0


def _interrupt_at(cmd, env, cwd, out: Path, stage: str, step: int, delay: float,
                  signum: int) -> int:
    """Start `cmd`, send `signum` `delay` s after the CSV holds `step` rows; its exit code."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while _rows(out, stage) < step:
        if proc.poll() is not None:
            pytest.fail(f"{stage} ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{stage} did not reach step {step} in time")
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signum)
    output = proc.communicate(timeout=240)[0]
    if signum == signal.SIGTERM and proc.returncode not in (130, 143, -signal.SIGTERM):
        pytest.fail(f"SIGTERM: exit code {proc.returncode}:\n{output[-3000:]}")
    return proc.returncode


def _final(out: Path, stage: str):
    run_dir = _csv(out, stage).parent
    tensors, _ = load_checkpoint(run_dir / "checkpoints" / f"{STAGES[stage][2]}.safetensors")
    return run_dir.name, tensors, pd.read_csv(_csv(out, stage))


@pytest.fixture(scope="module", params=sorted(STAGES))
def reference(request, tmp_path_factory):
    """One uninterrupted run of each stage in its own store."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"reference_{stage}")
    env = _env(f"sqlite:///{tmp}/m.db")
    done = subprocess.run(_command(tmp / "out", False, stage), cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    run_id, tensors, frame = _final(tmp / "out", stage)
    return stage, tensors, frame, MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_interrupted_and_resumed_ten_times_equals_one_uninterrupted_run(
        signum, reference, mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    stage, ref_tensors, ref_frame, ref_metrics = reference
    loss_column, epoch_keys = STAGES[stage][3], STAGES[stage][4]
    env = _env(mlflow_store)
    out = tmp_path / "out"
    rng = random.Random(1000 + signum + (0 if stage == "stage2" else 7))  # seeded: same points
    points = sorted(rng.sample(range(1, STEPS), N_POINTS))
    codes = []
    for i, step in enumerate(points):
        codes.append(_interrupt_at(_command(out, i > 0, stage), env, tmp_path, out, stage, step,
                                   rng.uniform(0.0, 0.4), signum))
    done = subprocess.run(_command(out, True, stage), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_id, tensors, frame = _final(out, stage)
    print(f"\n{stage} {signal.Signals(signum).name} at steps {points}, exit codes {codes}")
    assert frame["step"].tolist() == list(range(1, STEPS + 1))  # each step once in the CSV
    assert frame[loss_column].tolist() == ref_frame[loss_column].tolist()
    assert tensors.keys() == ref_tensors.keys()
    unequal = [k for k in tensors if not torch.equal(tensors[k], ref_tensors[k])]
    assert not unequal, f"final weights differ from the uninterrupted run's: {unequal[:5]}"

    client = MlflowClient(mlflow_store)
    for key in ("train_loss", "learning_rate", "grad_norm"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), (key, steps)  # each step once in MLflow
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert [losses[s] for s in range(1, STEPS + 1)] == ref_frame[loss_column].tolist()
    for key in epoch_keys:
        epochs = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert epochs == list(range(1, EPOCHS + 1)), (key, epochs)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    if stage == "stage2":
        assert run.data.tags["init.source"] == "scratch"  # not overwritten by the resumes
    for key in ("final_train_loss", *epoch_keys):
        assert run.data.metrics[key] == ref_metrics[key], key  # restored, not recomputed
