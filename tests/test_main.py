"""`main` on the tiny profile: four child runs under one parent, reused on a rerun.

`main` runs its children through `mlflow.projects.run(".")`, so it runs from the project root;
the tracking store and the artifacts stay under tmp_path. The children's local copies
(`outputs/<stage>/<run id>`) land in the project's ignored `outputs/` and are removed after.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import EXPERIMENT_NAME

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--profile", "tiny", "--llm", "tiny-random"]
CHILDREN = ("stage1", "validate", "stage2", "evaluate")


def _run_main(tracking_uri: str, args=ARGS) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(ROOT),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    return subprocess.run([sys.executable, "-m", "steps.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _runs_by_stage(client: MlflowClient) -> dict[str, list]:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    by_stage: dict[str, list] = {}
    for run in client.search_runs(experiment_ids, max_results=1000):
        by_stage.setdefault(run.data.tags.get("pipeline.stage"), []).append(run)
    return by_stage


def _remove_local_outputs(client: MlflowClient) -> None:
    outputs = ROOT / "outputs"
    for stage, runs in _runs_by_stage(client).items():
        for run in runs:
            shutil.rmtree(outputs / str(stage) / run.info.run_id, ignore_errors=True)
    for folder in [*(outputs / stage for stage in CHILDREN), outputs]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-5000:]}")


def test_main_runs_every_step_as_a_child_and_a_rerun_reuses_them(mlflow_store, tmp_path):
    client = MlflowClient()
    # Artifacts under tmp_path rather than the project's ./mlruns.
    client.create_experiment(EXPERIMENT_NAME, artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        first = _run_main(mlflow_store)
        assert first.returncode == 0, _tail(first)

        by_stage = _runs_by_stage(client)
        for stage in ("main", *CHILDREN):
            assert len(by_stage.get(stage, [])) == 1, \
                f"{stage}: {len(by_stage.get(stage, []))} runs\n{_tail(first)}"
        (parent,) = by_stage["main"]
        parent_id = parent.info.run_id
        children = {stage: by_stage[stage][0] for stage in CHILDREN}
        for stage, run in children.items():
            assert run.data.tags.get("mlflow.parentRunId") == parent_id, stage
            assert run.info.status == "FINISHED", stage
        assert client.get_run(parent_id).info.status == "FINISHED"

        # The tiny random LM cannot be steered by the image: the champion gate refuses it.
        evaluated = client.search_model_versions("name='report-vlm'")
        assert [v.tags["source_run"] for v in evaluated] == [children["stage2"].info.run_id]
        assert evaluated[0].tags["champion.verdict"] == "rejected"
        assert children["evaluate"].data.tags["champion.verdict"] == "rejected"
        # The runs table reads as the pipeline: each run named for what it is.
        names = {stage: run.info.run_name for stage, run in children.items()}
        assert names["stage1"] == "stage1 findings lr=0.001 tiny", names
        assert names["validate"] == "validate -> approved", names
        assert names["stage2"].startswith("stage2 findings lr=0.001 init=checkpoint"), names
        assert names["evaluate"] == "evaluate rejected test", names
        assert parent.info.run_name == "main tiny"
        assert parent.data.params["profile"] == "tiny" and "data.digest" in parent.data.params
        assert "grounding gap" in children["evaluate"].data.tags["champion.reasons"]
        assert children["evaluate"].data.params["model"] == children["stage2"].info.run_id
        assert f"evaluate {children['evaluate'].info.run_id}" in first.stdout
        assert "mlflow ui --backend-store-uri" in first.stdout

        second = _run_main(mlflow_store)
        assert second.returncode == 0, _tail(second)
        for stage, run in children.items():
            assert f"[main] {stage}: reusing finished run {run.info.run_id}" in second.stderr, \
                f"{stage} not reused\n{_tail(second)}"
        again = _runs_by_stage(client)
        for stage in CHILDREN:
            assert [r.info.run_id for r in again[stage]] == [children[stage].info.run_id], stage
        assert len(again["main"]) == 2
        assert all("champion" not in v.aliases
                   for v in client.search_model_versions("name='report-vlm'"))
    finally:
        _remove_local_outputs(client)


def test_main_tiny_profile_runs_as_documented_with_the_profiles_llm(mlflow_store, tmp_path):
    """`python -m steps.main --profile tiny`, no --llm: Stage 2 uses the tiny profile's LLM."""
    client = MlflowClient()
    client.create_experiment(EXPERIMENT_NAME, artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        proc = _run_main(mlflow_store, ["--profile", "tiny"])
        assert proc.returncode == 0, _tail(proc)
        by_stage = _runs_by_stage(client)
        for stage in ("main", *CHILDREN):
            assert [r.info.status for r in by_stage.get(stage, [])] == ["FINISHED"], stage
        assert by_stage["stage2"][0].data.tags["llm.name"] == "tiny-random"
    finally:
        _remove_local_outputs(client)


def test_main_starts_stage2_from_the_version_of_its_own_stage1_run(mlflow_store, monkeypatch):
    """The alias points at another Stage 1's version: Stage 2 must not take that one."""
    from click.testing import CliRunner

    from steps import main as step

    client = MlflowClient()
    exp = client.create_experiment("stage1-runs")
    ours, other = (client.create_run(exp).info.run_id for _ in range(2))
    client.set_tag(ours, "gate.verdict", "approved")
    client.create_registered_model("vision-bridge")
    versions = {}
    for run_id in (ours, other):  # ours first: the alias then moves on to the other's version
        versions[run_id] = client.create_model_version(
            "vision-bridge", f"runs:/{run_id}/model", run_id=run_id,
            tags={"source_run": run_id, "gate.verdict": "approved"}).version
        client.set_registered_model_alias("vision-bridge", "stage2-ready", versions[run_id])
    calls = {}

    def fake_step(name, params, commit, allow_fail=False):
        calls[name] = params
        return {"stage1": ours}.get(name, f"{name}-run"), True

    monkeypatch.setattr(step, "_step", fake_step)
    monkeypatch.setattr(step, "_summary", lambda *args: None)
    result = CliRunner().invoke(step.main, ["--profile", "tiny"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls["stage2"]["init"] == f"models:/vision-bridge/{versions[ours]}"
