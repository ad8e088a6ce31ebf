"""Stage 1 on the tiny profile: objectives, guards, checkpoints, tracking read back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from pipeline import config as C
from pipeline.checkpoint import load_checkpoint, sha256_file
from pipeline.guards import GuardError, check_finite_grads, check_finite_loss
from pipeline.train.health import feature_health, health_failures
from pipeline.stage1.objectives import l2_proxy, vicreg

ROOT = Path(__file__).resolve().parents[1]


def test_l2_proxy_is_exactly_the_old_proxy():
    tokens = torch.randn(2, 5, 7)
    assert torch.equal(l2_proxy(tokens), tokens.pow(2).mean())


def test_vicreg_penalises_the_collapsed_solution():
    collapsed = torch.zeros(2, 8, 16)
    spread = torch.randn(2, 8, 16)
    assert vicreg(collapsed, collapsed)["loss"] > 10.0  # variance hinge: 25 * 1.0
    assert vicreg(spread, spread)["loss"] < vicreg(collapsed, collapsed)["loss"]


def test_feature_health_separates_dead_from_live_features():
    cfg = C.HealthConfig()
    live = feature_health(torch.randn(8, 4, 32))
    dead = feature_health(torch.randn(8, 4, 32) * 1e-6)
    one_direction = feature_health(torch.ones(8, 4, 32) + 1e-4 * torch.randn(8, 4, 32))
    assert health_failures(live, cfg) == []
    assert any("feature_std" in r for r in health_failures(dead, cfg))
    assert any("effective_rank" in r or "normalized_std" in r
               for r in health_failures(one_direction, cfg))


def test_finite_guards_name_the_step_and_parameter():
    with pytest.raises(GuardError, match="step 7"):
        check_finite_loss(torch.tensor(float("nan")), 7)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(GuardError, match="enc.w"):
        check_finite_grads([("enc.w", p)], 3)


def _run_cli(args):
    from steps import stage1 as step

    return CliRunner().invoke(step.main, ["--profile", "tiny", *args], catch_exceptions=False)


@pytest.mark.parametrize("objective", ["vicreg", "l2_proxy"])
def test_stage1_cli_logs_everything(objective, mlflow_store):
    result = _run_cli(["--objective", objective, "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    data = run.data
    assert run.info.status == "FINISHED"
    assert data.tags["pipeline.stage"] == "stage1"
    assert data.params["lr"] == "0.0001" and data.params["objective"] == objective
    assert data.params["encoder.depth"] == "1" and "bridge.max_visual_tokens" in data.params
    for key in ("final_train_loss", "val_loss", "epoch_train_loss", "train_loss",
                "health_feature_std", "health_normalized_std", "health_effective_rank"):
        assert key in data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 13))  # 12 samples / bs 2 * 2 epochs, each step once
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/vision_bridge_best_val.safetensors",
            "checkpoints/vision_bridge_final.safetensors",
            "checkpoints/vision_bridge_step4.safetensors"} <= arts
    logs = [a.path for a in client.list_artifacts(run.info.run_id, "logs")]
    assert len(logs) == 1 and Path(logs[0]).name.startswith("stage1_lr0.0001_bs2_")
    assert client.list_artifacts(run.info.run_id, "plots")[0].path.endswith(".png")
    assert client.list_artifacts(run.info.run_id, "config")
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest
    final = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/vision_bridge_final.safetensors")
    assert sha256_file(final) == data.tags["checkpoint.vision_bridge_final.sha256"]
    _, meta = load_checkpoint(final)
    assert meta["stage"] == "stage1" and meta["run_id"] == run.info.run_id
    assert meta["objective"] == objective and meta["lr"] == 1e-4
    assert meta["final_loss"] == pytest.approx(data.metrics["final_train_loss"])
    assert "encoder" in meta["config"]


def test_low_loss_prints_the_warning_and_tags_the_run(mlflow_store, monkeypatch):
    # A model whose features are ~0 from the start: l2_proxy loss < 1e-3 in epoch 1.
    from pipeline.models.vision_bridge import VisionBridge

    original = VisionBridge.from_config

    def tiny_output(*args, **kwargs):
        model = original(*args, **kwargs)
        for p in model.parameters():
            p.data.mul_(1e-3)
        return model

    monkeypatch.setattr(VisionBridge, "from_config", staticmethod(tiny_output))
    result = _run_cli(["--objective", "l2_proxy"])
    assert result.exit_code == 0
    assert "Do not initialise Stage 2 from this run; use --from_scratch" in result.output
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["health.collapse_suspected"] == "true"


def test_non_finite_loss_stops_the_run_naming_the_step(mlflow_store, monkeypatch):
    import pipeline.stage1.trainer as s1

    calls = {"n": 0}
    real = s1.objective_loss

    def poisoned(*args, **kwargs):
        loss, terms, tokens = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), terms, tokens

    monkeypatch.setattr(s1, "objective_loss", poisoned)
    from steps import stage1 as step

    result = CliRunner().invoke(step.main, ["--profile", "tiny"])
    assert result.exit_code == 2
    assert "non-finite loss nan at step 3" in result.output
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FAILED"


def test_sigterm_saves_the_last_checkpoint_and_ends_killed(mlflow_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                             "--epochs", "200", "--output_dir", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not list((tmp_path / "out").glob("*/checkpoints/*step*")):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "KILLED"
    arts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id,
                                                                          "checkpoints")]
    assert any("step" in a for a in arts)
    # The save on interrupt happened: the newest step checkpoint was written after the signal
    # and holds the last step the run logged (not merely an earlier periodic one).
    saved = max((tmp_path / "out").glob("*/checkpoints/vision_bridge_step*.safetensors"),
                key=lambda p: int(p.stem.removeprefix("vision_bridge_step")))
    # (File mtimes come from a coarse clock, a few ms; the checkpoint says which save it was.)
    assert load_checkpoint(saved)[1].get("interrupted") is True, \
        "no checkpoint was saved on interrupt"
    last_step = max(m.step for m in mlflow.tracking.MlflowClient().get_metric_history(
        run.info.run_id, "train_loss"))
    assert load_checkpoint(saved)[1]["step"] == last_step
    assert f"checkpoints/{saved.name}" in arts


@pytest.mark.parametrize("second_signal", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_under_mlflow_run_ends_killed_even_when_signalled_twice(
        mlflow_store, tmp_path, second_signal):
    """The child side of `mlflow run`: MLFLOW_RUN_ID names the run; Ctrl-C reaches the whole
    process group and `mlflow run` then sends SIGTERM to cancel its child. The child must still
    save, end the run KILLED and exit 130 (mlflow then leaves a terminated run as it is)."""
    client = mlflow.tracking.MlflowClient()
    run_id = client.create_run(client.create_experiment("under-mlflow-run")).info.run_id
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_store,
           "MLFLOW_RUN_ID": run_id}
    proc = subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                             "--epochs", "200", "--output_dir", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and not list((tmp_path / "out").glob("*/checkpoints/*step*")):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    # mlflow's cancel() follows at once (and an impatient user presses Ctrl-C again) while
    # the child saves and ends its run.
    for _ in range(25):
        if proc.poll() is not None:
            break
        proc.send_signal(second_signal)
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert client.get_run(run_id).info.status == "KILLED", out
    assert client.get_run(run_id).data.tags["pipeline.interrupted"] == "true"
    assert "the run ended KILLED" in out
    saved = list((tmp_path / "out" / run_id / "checkpoints").glob("vision_bridge_step*"))
    assert saved and not list((tmp_path / "out" / run_id / "checkpoints").glob("*.tmp")), out


def test_two_runs_started_at_once_on_a_fresh_store_both_finish(tmp_path):
    """Two Stage 1 runs racing to create one fresh sqlite store (MLflow's schema migrations
    are not safe to run twice at once) both finish."""
    store = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=store)
    procs = [subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                               "--epochs", "1", "--output_dir", str(tmp_path / f"o{i}")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-2000:] for o in outputs)
    mlflow.set_tracking_uri(store)
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    finally:
        mlflow.set_tracking_uri(None)


def test_a_findings_run_saves_its_training_weights_as_the_head_prior(mlflow_store):
    from pipeline.data import load_dataset
    from pipeline.models.findings import FINE, positive_weights
    from pipeline.models.loading import PRIOR_KEY, weights_of

    result = _run_cli(["--objective", "findings"])
    assert result.exit_code == 0, result.output
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    final = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/vision_bridge_final.safetensors")
    train = load_dataset(C.build(C.Stage1Config, "tiny").data)["train"]
    expected = torch.log(positive_weights([r.report for r in train])[:len(FINE)])
    assert torch.allclose(weights_of(Path(final))[0][PRIOR_KEY], expected)
