"""Stage 1 resume: an interrupted or killed run continues in the same MLflow run and ends with
the weights and per-step losses of an uninterrupted run, every step logged once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pipeline.checkpoint import load_checkpoint
from tests.processes import wait_for_csv_rows

ROOT = Path(__file__).resolve().parents[1]
# Tiny profile: 12 train samples, batch 2 -> 6 steps per epoch, a step checkpoint every 4.
ARGS = ["--profile", "tiny", "--epochs", "3"]
STEPS = 18


def _cli(*args):
    from steps import stage1 as step

    return CliRunner().invoke(step.main, [*ARGS, *args], catch_exceptions=False)


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _train_losses(run_id: str) -> dict[int, float]:
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, STEPS + 1)), f"each step exactly once: {sorted(steps)}"
    return {m.step: m.value for m in history}


def _final(out: Path, run_id: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / run_id / "checkpoints" / "vision_bridge_final.safetensors")[0]


def _assert_same_run(reference: tuple, resumed: tuple) -> None:
    (ref_out, ref_id), (out, run_id) = reference, resumed
    assert _train_losses(run_id) == _train_losses(ref_id)
    ref, got = _final(ref_out, ref_id), _final(out, run_id)
    assert ref.keys() == got.keys()
    unequal = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not unequal, f"final weights differ from the uninterrupted run: {unequal[:5]}"
    frame = pd.read_csv(out / run_id / "stage1_train_log.csv")
    assert frame["step"].tolist() == list(range(1, STEPS + 1))
    assert frame["train_loss"].tolist() == pd.read_csv(
        ref_out / ref_id / "stage1_train_log.csv")["train_loss"].tolist()
    epochs = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_loss")]
    assert sorted(epochs) == [1, 2, 3]


@pytest.fixture()
def keep_signal_handlers():
    """An interrupted run leaves SIGINT/SIGTERM ignored (its exit path); not the test's."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_interrupt_then_resume_equals_the_uninterrupted_run(mlflow_store, tmp_path, monkeypatch,
                                                            keep_signal_handlers):
    from pipeline.stage1.trainer import Stage1Trainer

    first = _cli("--output_dir", str(tmp_path / "ref"))
    assert first.exit_code == 0, first.output
    reference = (tmp_path / "ref", _runs()[0].info.run_id)

    real_step = Stage1Trainer._step

    def interrupted_at_7(self, batch, epoch):
        if self.step == 6:  # step 7 of 18, in epoch 2, not on a periodic checkpoint
            raise KeyboardInterrupt("test")
        return real_step(self, batch, epoch)

    monkeypatch.setattr(Stage1Trainer, "_step", interrupted_at_7)
    out = tmp_path / "resumed"
    stopped = _cli("--output_dir", str(out))
    assert stopped.exit_code == 130, stopped.output
    run_id = next(r.info.run_id for r in _runs() if r.info.run_id != reference[1])
    assert mlflow.get_run(run_id).info.status == "KILLED"
    saved = load_checkpoint(out / run_id / "checkpoints" / "vision_bridge_step6.safetensors")[1]
    assert saved["interrupted"] is True and saved["resume"]["batch_in_epoch"] == 0
    monkeypatch.setattr(Stage1Trainer, "_step", real_step)

    resumed = _cli("--output_dir", str(out), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert len(_runs()) == 2, "the resumed run re-attaches to its MLflow run"
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    _assert_same_run(reference, (out, run_id))


def _stage1(args, env, cwd):
    return subprocess.Popen([sys.executable, "-m", "steps.stage1", *ARGS, *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill9_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(mlflow_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_store,
           "OMP_NUM_THREADS": "1"}
    reference = _stage1(["--output_dir", str(tmp_path / "ref")], env, tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    ref_id = _runs()[0].info.run_id

    out = tmp_path / "killed"
    proc = _stage1(["--output_dir", str(out)], env, tmp_path)
    log = wait_for_csv_rows(out, "*/stage1_train_log.csv", 9, proc)  # after the step-8 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = log.parent.name
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so
    assert 9 <= len(pd.read_csv(log)) < STEPS

    resumed = subprocess.run([sys.executable, "-m", "steps.stage1", *ARGS, "--output_dir",
                              str(out), "--resume", str(out / run_id)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    _assert_same_run((tmp_path / "ref", ref_id), (out, run_id))


def test_resume_of_a_folder_without_step_checkpoint_is_one_error_line(mlflow_store, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli("--resume", str(tmp_path / "empty"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no step checkpoint" in errors[0], result.output


def test_a_csv_log_starts_its_own_folder(tmp_path):
    """A trainer driven from a script (benchmarks/bench_learning.py), not a job, writes its CSV
    log into a folder nobody created; the first row creates it."""
    from pipeline.train.resume import append_csv_row

    path = tmp_path / "new" / "deeper" / "train_log.csv"
    append_csv_row(path, ["step", "loss"], {"step": 1, "loss": 0.5})
    append_csv_row(path, ["step", "loss"], {"step": 2, "loss": 0.4})
    assert path.read_text(encoding="utf-8").splitlines() == ["step,loss", "1,0.5", "2,0.4"]
