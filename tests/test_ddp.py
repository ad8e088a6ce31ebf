"""Data-parallel training under torchrun (gloo, CPU, tiny profile): one MLflow run per job,
the per-step losses of one process with the same global batch, and resume after a rank dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline import config as C
from pipeline.checkpoint import load_checkpoint
from pipeline.models.loading import load_into, model_tensors
from tests.processes import wait_for_csv_rows

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# One process at batch 2 and two at batch 1 see the same global batches in the same order.
# Not bitwise: a batch of 2 and two batches of 1 sum in another order (float rounding).
RTOL = 1e-4

pytestmark = pytest.mark.slow


def _env(store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}


def _run(cmd, env, cwd, timeout=300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _losses(run_id: str, steps: int) -> list[float]:
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "each step once"
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.parametrize("stage, extra, final, steps", [
    ("stage1", [], "vision_bridge_final", 12),
    ("stage2", ["--init", "scratch"], "vision_bridge_vlm_final", 12)])
def test_two_ranks_match_one_process_with_the_same_global_batch(mlflow_store, tmp_path, stage,
                                                                extra, final, steps):
    env = _env(mlflow_store)
    module = ["-m", f"steps.{stage}", "--profile", "tiny", *extra]
    _run([sys.executable, *module, "--batch_size", "2", "--output_dir", "single"], env, tmp_path)
    (single,) = _runs()
    # `--nproc 2`: the program relaunches itself under torchrun.
    _run([sys.executable, *module, "--batch_size", "1", "--nproc", "2", "--output_dir", "ddp"],
         env, tmp_path)
    runs = _runs()
    assert len(runs) == 2, "rank 1 opened a run of its own"
    ddp = next(r for r in runs if r.info.run_id != single.info.run_id)
    assert ddp.info.status == "FINISHED"
    params = ddp.data.params
    assert (params["batch_size_per_rank"], params["world_size"], params["global_batch_size"]) \
        == ("1", "2", "2")
    assert single.data.params["world_size"] == "1"
    assert _losses(ddp.info.run_id, steps) == pytest.approx(
        _losses(single.info.run_id, steps), rel=RTOL)
    csv = next((tmp_path / "ddp").glob(f"*/{stage}_train_log.csv"))
    assert pd.read_csv(csv)["step"].tolist() == list(range(1, steps + 1))

    # The group's checkpoint is a plain single-process vision-bridge.
    from pipeline.models.vision_bridge import VisionBridge

    tensors, meta = load_checkpoint(tmp_path / "ddp" / ddp.info.run_id / "checkpoints"
                                    / f"{final}.safetensors")
    cfg = C.from_dict(C.Stage1Config if stage == "stage1" else C.Stage2Config, meta["config"])
    width = meta.get("hidden_size", getattr(cfg, "embed_dim", None))
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=width)
    assert load_into(model, model_tensors(tensors), "ddp final") == []


def _rank_pid(launcher: subprocess.Popen, rank: int, module: str) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and module in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("stage, extra", [("stage1", []), ("stage2", ["--init", "scratch"])])
def test_kill9_of_one_rank_stops_the_group_and_resume_logs_every_step_once(mlflow_store,
                                                                           tmp_path, stage,
                                                                           extra):
    env = _env(mlflow_store)
    module = ["-m", f"steps.{stage}", "--profile", "tiny", "--epochs", "3", "--batch_size", "1",
              "--output_dir", "out", *extra]
    steps = 18  # 12 samples / global batch 2 * 3 epochs; a step checkpoint every 4
    launcher = subprocess.Popen([*TORCHRUN, *module], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill rank 1 in epoch 2, after the step-8 checkpoint.
    log = wait_for_csv_rows(tmp_path / "out", f"*/{stage}_train_log.csv", 9, launcher)
    os.kill(_rank_pid(launcher, 1, f"steps.{stage}"), signal.SIGKILL)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, out  # torchrun tore the group down
    run_id = log.parent.name
    assert mlflow.get_run(run_id).info.status in ("RUNNING", "KILLED", "FAILED")
    assert len(pd.read_csv(log)) < steps

    _run([*TORCHRUN, *module[:-len(extra) or None], "--resume", "auto"], env, tmp_path)
    assert [r.info.run_id for r in _runs()] == [run_id]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert pd.read_csv(log)["step"].tolist() == list(range(1, steps + 1))
    _losses(run_id, steps)
    epochs = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_loss")]
    assert sorted(epochs) == [1, 2, 3]


# Run under torchrun: on rank 1 only, `<module>.<name>` raises a GuardError from its N-th call
# on; then the step program runs as usual. Rank 0 ends its run slowly (a slow tracking
# server): rank 1 must not exit, and so have torchrun stop rank 0, before rank 0 is done.
_POISON = '''
import importlib, os, sys, time
import mlflow
from pipeline.guards import GuardError
real_end_run = mlflow.end_run

def slow_end_run(*args, **kwargs):
    if os.environ["RANK"] == "0":
        time.sleep(3)
    return real_end_run(*args, **kwargs)

mlflow.end_run = slow_end_run
module_name, name, nth, program = sys.argv[1:5]
module, calls = importlib.import_module(module_name), [0]
real = getattr(module, name)

def poisoned(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] >= int(nth):
        raise GuardError(f"test guard fired on call {calls[0]}")
    return real(*args, **kwargs)

setattr(module, name, poisoned)
sys.argv = [program, *sys.argv[5:]]
importlib.import_module(program).main()
'''


@pytest.mark.parametrize("stage, target, nth, extra", [
    ("stage1", "pipeline.stage1.trainer:check_finite_loss", 3, []),  # step 3
    ("stage2", "pipeline.stage2.trainer:check_label_mask", 1, ["--init", "scratch"])])  # preflight
def test_a_guard_on_one_rank_stops_every_rank_with_one_error(mlflow_store, tmp_path, stage,
                                                              target, nth, extra):
    script = tmp_path / "poison.py"
    script.write_text(_POISON)
    module, name = target.split(":")
    done = subprocess.run([*TORCHRUN, str(script), module, name, str(nth), f"steps.{stage}",
                           "--profile", "tiny", "--batch_size", "1", "--output_dir", "out",
                           *extra], cwd=tmp_path, env=_env(mlflow_store), capture_output=True,
                          text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    assert "test guard fired" in errors[0] and "rank 1 of 2" in errors[0], errors
    (run,) = _runs()
    assert run.info.status == "FAILED"


def test_ctrl_c_of_the_program_saves_where_the_group_stood_and_ends_killed(mlflow_store,
                                                                            tmp_path):
    """`--nproc 2` and Ctrl-C: the program passes the stop to torchrun and its ranks; each
    rank finishes its step, rank 0 saves and ends the run KILLED, the program exits 130."""
    proc = subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                             "--epochs", "50", "--batch_size", "1", "--nproc", "2",
                             "--output_dir", "out"], cwd=tmp_path, env=_env(mlflow_store),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = wait_for_csv_rows(tmp_path / "out", "*/stage1_train_log.csv", 6, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-4000:]
    run = mlflow.get_run(log.parent.name)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.interrupted"] == "true"
    logged = max(m.step for m in mlflow.tracking.MlflowClient().get_metric_history(
        run.info.run_id, "train_loss"))
    saved = max((log.parent / "checkpoints").glob("vision_bridge_step*.safetensors"),
                key=lambda p: int(p.stem.removeprefix("vision_bridge_step")))
    meta = load_checkpoint(saved)[1]
    assert meta["interrupted"] is True and meta["step"] == logged == len(pd.read_csv(log))
