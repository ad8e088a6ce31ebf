"""The gate end to end on a temporary MLflow store: approve, reject, idempotence, alias safety."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from mlflow.tracking import MlflowClient

from pipeline import config as C
from pipeline.checkpoint import save_checkpoint, sha256_file
from pipeline.tracking.registry import VISION_ALIAS, VISION_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _stage1(args=()):
    from steps import stage1

    result = CliRunner().invoke(stage1.main, ["--profile", "tiny", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`pipeline.stage` = 'stage1'")[0]


def _validate(args):
    from steps import validate

    return CliRunner().invoke(validate.main, ["--profile", "tiny", *args])


def _alias_run():
    version = MlflowClient().get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)
    return version.tags["source_run"], version.version


def test_healthy_run_is_approved_once_and_alias_resolves(mlflow_store):
    run = _stage1()
    result = _validate([])  # default: the latest finished Stage 1 run
    assert result.exit_code == 0, result.output
    source, version = _alias_run()
    assert source == run.info.run_id
    assert MlflowClient().get_run(run.info.run_id).data.tags["gate.verdict"] == "approved"
    local = mlflow.artifacts.download_artifacts(f"models:/{VISION_MODEL}@{VISION_ALIAS}")
    assert list(Path(local).rglob("*.safetensors"))
    assert _validate(["--stage1_run", run.info.run_id]).exit_code == 0
    versions = MlflowClient().search_model_versions(f"name='{VISION_MODEL}'")
    assert len(versions) == 1 and _alias_run()[1] == version
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`pipeline.stage` = 'validate'")
    assert len(runs) == 2 and all(r.data.tags["gate.verdict"] == "approved" for r in runs)
    assert "gate.final_loss_finite.passed" in runs[0].data.metrics


def test_collapsed_l2_proxy_at_high_lr_is_rejected_with_reasons(mlflow_store, monkeypatch):
    from pipeline.models.vision_bridge import VisionBridge

    original = VisionBridge.from_config

    def dead(*args, **kwargs):  # start near zero: the l2_proxy run ends collapsed
        model = original(*args, **kwargs)
        for p in model.parameters():
            p.data.mul_(1e-4)
        return model

    monkeypatch.setattr(VisionBridge, "from_config", staticmethod(dead))
    run = _stage1(["--objective", "l2_proxy", "--lr", "1e-4"])
    result = _validate(["--stage1_run", run.info.run_id])
    assert result.exit_code == 2
    line = [l for l in result.output.splitlines() if l.startswith("error:")][0]
    assert "final_train_loss" in line and "max_lr" in line
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["gate.verdict"] == "rejected" and "max_lr" in tags["gate.reasons"]


def test_sigkilled_run_left_running_is_rejected(mlflow_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                             "--epochs", "200", "--output_dir", str(tmp_path / "o")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and not list((tmp_path / "o").glob("*/checkpoints/*final*")) \
            and not list((tmp_path / "o").glob("*/checkpoints/*best_val*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "RUNNING"
    result = _validate(["--stage1_run", run.info.run_id])
    assert result.exit_code == 2 and "RUNNING" in result.output


def test_checkpoint_modified_after_logging_is_rejected(mlflow_store):
    run = _stage1()
    art = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / \
        "vision_bridge_final.safetensors"
    data = bytearray(art.read_bytes())
    data[-1] ^= 0xFF
    art.write_bytes(bytes(data))
    result = _validate(["--stage1_run", run.info.run_id])
    assert result.exit_code == 2 and "modified after logging" in result.output
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)


def _legacy(path, collapse: bool):
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage1Config, "tiny")
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    state = model.state_dict()
    if collapse:  # dead features: the bridge's output projection and norm are all zero
        state = {k: torch.zeros_like(v) if k.startswith("bridge.") else v for k, v in state.items()}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("collapse", [True, False])
def test_legacy_pt_is_judged_by_its_features(mlflow_store, tmp_path, collapse):
    path = _legacy(tmp_path / "old.pt", collapse)
    result = _validate(["--checkpoint", str(path)])
    if collapse:
        assert result.exit_code == 2 and "feature_std" in result.output
    else:
        assert result.exit_code == 0, result.output
        version = MlflowClient().get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)
        assert version.tags["checkpoint_sha256"] == sha256_file(path)


# ---- property test over generated run histories on a real store -------------------------

def _fake_run(client, exp, ckpt, status, loss, lr, objective, health, intact):
    run = client.create_run(exp, tags={"pipeline.stage": "stage1"})
    rid = run.info.run_id
    if lr is not None:
        client.log_param(rid, "lr", str(lr))
    client.log_param(rid, "objective", objective)
    if loss is not None:
        client.log_metric(rid, "final_train_loss", loss)
    for key, value in health.items():
        client.log_metric(rid, f"health_{key}", value)
    client.log_artifact(rid, str(ckpt), "checkpoints")
    client.set_tag(rid, "checkpoint.vision_bridge_final.sha256",
                   sha256_file(ckpt) if intact else "0" * 64)
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


health_values = st.sampled_from([0.0, 1e-5, 0.05, 0.5, 5.0, float("nan")])


@pytest.mark.property
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=st.lists(st.tuples(
    st.sampled_from(["FINISHED", "RUNNING", "FAILED", "KILLED"]),
    st.sampled_from([None, 1e-5, 5e-3, 0.7, float("inf")]),
    st.sampled_from([1e-6, 1e-5, 1e-4]), st.sampled_from(["vicreg", "l2_proxy"]),
    health_values, health_values, st.sampled_from([1.0, 3.0, 6.0]), st.booleans()),
    min_size=1, max_size=3))
def test_verdict_equals_rule_conjunction_and_alias_never_on_rejected(history):
    gate = C.build(C.GateConfig, "tiny")
    # Each example has its own store: nothing the previous one set may point into it
    # (set_experiment exports MLFLOW_EXPERIMENT_ID and the fluent API caches the id).
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/m.db"
        old_cwd = os.getcwd()
        os.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            client = MlflowClient()
            exp = client.create_experiment("prop")
            ckpt = save_checkpoint(Path(tmp) / "vision_bridge_final", {"w": torch.ones(2)},
                                   {"stage": "stage1"})
            for status, loss, lr, objective, fstd, nstd, rank, intact in history:
                health = {"feature_std": fstd, "normalized_std": nstd, "effective_rank": rank}
                rid = _fake_run(client, exp, ckpt, status, loss, lr, objective, health, intact)
                ok = lambda v, f: not math.isnan(v) and v >= f  # noqa: E731
                expected = (status == "FINISHED" and loss is not None and math.isfinite(loss)
                            and (objective != "l2_proxy"
                                 or (loss >= gate.min_final_loss and lr <= gate.max_lr))
                            and ok(fstd, gate.health.min_feature_std)
                            and ok(nstd, gate.health.min_normalized_std)
                            and ok(rank, gate.health.min_effective_rank) and intact)
                result = _validate(["--stage1_run", rid])
                assert (result.exit_code == 0) == expected, (result.output, history)
                try:
                    version = client.get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)
                except mlflow.exceptions.MlflowException:
                    continue
                source = version.tags["source_run"]
                assert client.get_run(source).data.tags["gate.verdict"] == "approved"
                assert version.tags["gate.verdict"] == "approved"
        finally:
            os.chdir(old_cwd)
            mlflow.set_tracking_uri(None)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            mlflow.tracking.fluent._active_experiment_id = None


# ---- the floors are those of the profile the weights were trained with -------------------

def _between_floors_run(tmp_path, recorded_profile):
    """A finished vicreg run whose health passes the tiny floors but not the default ones."""
    client = MlflowClient()
    exp = client.create_experiment(f"floors-{recorded_profile}")
    ckpt = save_checkpoint(tmp_path / recorded_profile / "vision_bridge_final",
                           {"w": torch.ones(2)}, {"stage": "stage1"})
    tiny, default = C.build(C.GateConfig, "tiny").health, C.GateConfig().health
    health = {"feature_std": (tiny.min_feature_std + default.min_feature_std) / 2,
              "normalized_std": (tiny.min_normalized_std + default.min_normalized_std) / 2,
              "effective_rank": (tiny.min_effective_rank + default.min_effective_rank) / 2}
    rid = _fake_run(client, exp, ckpt, "RUNNING", 0.7, 1e-5, "vicreg", health, True)
    if recorded_profile != "none":
        client.log_param(rid, "profile", recorded_profile)
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.mark.parametrize("recorded,option,approved", [
    ("tiny", None, True),         # validate's own default (`default`) must not decide
    ("default", "tiny", False),   # the run's profile wins over --profile
    ("none", "tiny", True),       # nothing recorded: --profile is the fallback
    ("none", None, False)])
def test_gate_judges_by_the_floors_of_the_profile_the_run_recorded(
        mlflow_store, tmp_path, recorded, option, approved):
    from steps import validate

    rid = _between_floors_run(tmp_path, recorded)
    args = ["--stage1_run", rid] + (["--profile", option] if option else [])
    result = CliRunner().invoke(validate.main, args)
    assert (result.exit_code == 0) == approved, result.output
    run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.`pipeline.stage` = 'validate'")[0]
    assert run.data.params["gate_profile"] == (recorded if recorded != "none" else
                                               option or "default")


def test_bare_checkpoint_is_judged_by_the_profile_in_its_metadata(mlflow_store, tmp_path):
    from pipeline.models.vision_bridge import VisionBridge
    from steps import validate

    cfg = C.build(C.Stage1Config, "tiny")
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    # Random init of the tiny model: effective_rank ~1.44, above the tiny floor (1.1) and
    # below the default one (1.5).
    path = save_checkpoint(tmp_path / "tiny_final", model.state_dict(),
                           {"stage": "stage1", "profile": "tiny", "config": C.to_dict(cfg)})
    result = CliRunner().invoke(validate.main, ["--checkpoint", str(path)])
    assert result.exit_code == 0, result.output


def _tiny_checkpoint(path, **metadata):
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage1Config, "tiny")
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    return save_checkpoint(path, model.state_dict(), {"stage": "stage1", "profile": "tiny",
                                                      "config": C.to_dict(cfg), **metadata})


def test_bare_checkpoint_metadata_and_source_run_rejection_decide(mlflow_store, tmp_path):
    collapsed = _tiny_checkpoint(tmp_path / "l2", objective="l2_proxy", lr=1e-4,
                                 final_loss=5e-5)
    result = _validate(["--checkpoint", str(collapsed)])
    assert result.exit_code == 2 and "max_lr" in result.output, result.output
    client = MlflowClient()
    run = client.create_run(client.create_experiment("src"), tags={"pipeline.stage": "stage1"})
    client.set_tag(run.info.run_id, "gate.verdict", "rejected")
    client.set_terminated(run.info.run_id, "FINISHED")
    from_rejected = _tiny_checkpoint(tmp_path / "v", objective="vicreg", lr=1e-5,
                                     final_loss=0.7, run_id=run.info.run_id)
    result = _validate(["--checkpoint", str(from_rejected)])
    assert result.exit_code == 2 and "source run was rejected" in result.output, result.output


def test_rejecting_a_bare_checkpoint_removes_the_alias_of_its_earlier_version(mlflow_store,
                                                                             tmp_path):
    path = _tiny_checkpoint(tmp_path / "ok", objective="l2_proxy", lr=1e-5, final_loss=0.01)
    assert _validate(["--checkpoint", str(path)]).exit_code == 0
    version = MlflowClient().get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)
    assert version.tags["source_run"] == f"file:{sha256_file(path)}"
    stricter = _validate(["--checkpoint", str(path), "--min_final_loss", "0.1"])
    assert stricter.exit_code == 2, stricter.output
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias(VISION_MODEL, VISION_ALIAS)
    assert MlflowClient().get_model_version(VISION_MODEL, version.version) \
        .tags["gate.verdict"] == "rejected"


def test_run_given_auto_values_is_judged_by_what_it_resolved(mlflow_store, tmp_path):
    """Under `mlflow run`, params hold "auto"; the gate reads `resolved.lr` / `.objective`."""
    client = MlflowClient()
    exp = client.create_experiment("auto-params")
    ckpt = save_checkpoint(tmp_path / "vision_bridge_final", {"w": torch.ones(2)},
                           {"stage": "stage1"})
    health = {"feature_std": 0.5, "normalized_std": 0.5, "effective_rank": 3.0}
    rid = _fake_run(client, exp, ckpt, "FINISHED", 0.7, "auto", "auto", health, True)
    client.log_param(rid, "resolved.lr", "0.001")
    client.log_param(rid, "resolved.objective", "findings")
    result = _validate(["--stage1_run", rid])
    assert result.exit_code == 0, result.output
