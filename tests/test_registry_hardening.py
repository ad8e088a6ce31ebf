"""The champion and the registry under stress: which file is promoted, what an unreachable
registry does, two evaluations at once, and the champion decision as a value.

Evaluations here are fakes (`evaluate_model` returns chosen numbers) over real registered
versions in a temporary store, so each test runs in seconds and decides the gate's outcome.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import save_checkpoint, sha256_file
from pipeline.evaluate.evaluation import EvalOutcome
from pipeline.tracking.outage import PATIENCE_ENV
from pipeline.tracking.registry import (VISION_ALIAS, VISION_MODEL, promote_vision_bridge,
                                        register_report_model, reject_stage1)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "report-vlm"


# ---- fixtures: Stage 2 runs with registered versions, and a fake evaluation ----------------

def _stage2_run(folder: Path, seed: int = 0) -> tuple[str, dict[str, Path], str]:
    """A Stage 2 run holding `best_val` and `final` checkpoints (different weights), its final
    registered like Stage 2 registers it; (run id, {kind: local file}, version)."""
    files = {}
    with mlflow.start_run() as run:
        mlflow.set_tag("pipeline.stage", "stage2")
        run_id = run.info.run_id
        for i, kind in enumerate(("best_val", "final")):
            files[kind] = save_checkpoint(
                folder / run_id / f"vision_bridge_vlm_{kind}",
                {"w": torch.full((4,), float(seed * 10 + i))},
                {"stage": "stage2", "run_id": run_id, "config": {"llm": {"name": "tiny-llm"}}})
            mlflow.log_artifact(str(files[kind]), "checkpoints")
        version = register_report_model(files["final"], run_id, "tiny-llm", {})
    return run_id, files, version


def _outcome(score: float, decoding: str = "greedy", num_beams: int = 1,
             n_candidates: int = 1) -> EvalOutcome:
    """What `evaluate_model` returns for a model that passes every rule but the champion's."""
    per_decoding = {"finding_coarse_macro_f1": 0.9, "finding_macro_f1": 0.8, "bleu4": 0.5,
                    "cider": 1.5, "rouge_l": 0.6, "distinct_share": 1.0, "n_reports": 4.0,
                    "report_form": 1.0, "contradiction_share": 0.0, "preamble_share": 0.0,
                    "chexpert_micro_f1": 0.7, "contradiction_share_as_written": 0.0,
                    "repaired_share": 0.0}
    blind = {"finding_coarse_macro_f1": 0.2, "finding_macro_f1": 0.1, "bleu4": 0.1,
             "cider": 0.2, "rouge_l": 0.3, "chexpert_micro_f1": 0.3}
    retrieval = {"finding_coarse_macro_f1": 0.6, "chexpert_micro_f1": 0.5, "bleu4": 0.3}
    metrics = {**{f"{decoding}_{k}": v for k, v in per_decoding.items()},
               **{f"blind_{k}": v for k, v in blind.items()},
               **{f"retrieval_{k}": v for k, v in retrieval.items()},
               "grounding_gap": 1.0, "score": score, "reference_report_form": 1.0}
    table = pd.DataFrame({"id": ["s0"], "reference": ["The heart is enlarged."],
                          f"generated_{decoding}": ["The heart is enlarged."]})
    outcome = EvalOutcome(metrics, table, Path("no-figure.png"), "score (test)", decoding, "",
                          "digest0")
    outcome.num_beams, outcome.n_candidates = num_beams, n_candidates  # how it was decoded
    return outcome


def _evaluate(monkeypatch, model: str, outcome: EvalOutcome, *args: str):
    from steps import evaluate

    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: outcome)
    return CliRunner().invoke(evaluate.main, ["--model", model, "--profile", "tiny",
                                              "--no-meteor", *args])


def _champion() -> str | None:
    aliases = MlflowClient().get_registered_model(MODEL).aliases
    return aliases.get("champion")


def _artifact_sha(version: str) -> str:
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}")
    (found,) = glob.glob(os.path.join(local, "**", "*.safetensors"), recursive=True)
    return sha256_file(found)


def _unreachable(*args, **kwargs):
    """What MLflow raises once its HTTP retries give up on a server that is down."""
    try:
        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
    except requests.exceptions.ConnectionError:
        raise MlflowException("API request to http://tracking/api failed with exception "
                              "Max retries exceeded (Connection refused)") from None


def _blip(monkeypatch, owner, *names: str) -> None:
    """The first call to any of `owner.names` meets an unreachable server; later calls pass."""
    down = [True]
    for name in names:
        original = getattr(owner, name)

        def flaky(*args, _original=original, **kwargs):
            if down[0]:
                down[0] = False
                _unreachable()
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, flaky)


# ---- the promoted file is the file that was scored -----------------------------------------

def test_evaluating_best_val_promotes_the_scored_file_not_the_runs_final_version(
        mlflow_store, tmp_path, monkeypatch):
    run_id, files, final_version = _stage2_run(tmp_path)

    result = _evaluate(monkeypatch, str(files["best_val"]), _outcome(0.5))
    assert result.exit_code == 0, result.output

    champion = _champion()
    assert champion is not None, result.output
    assert _artifact_sha(champion) == sha256_file(files["best_val"]), \
        f"champion -> version {champion}, which holds {run_id}'s final weights, not the " \
        "best_val file that was scored"
    client = MlflowClient()
    assert client.get_registered_model(MODEL).aliases["candidate"] == final_version
    assert "eval.score" not in client.get_model_version(MODEL, final_version).tags, \
        "the final weights were never evaluated"

    # The final file, scored higher, is the version Stage 2 registered: no third version.
    result = _evaluate(monkeypatch, run_id, _outcome(0.7))
    assert result.exit_code == 0, result.output
    assert _champion() == final_version
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2


# ---- an unreachable registry is not an empty one -------------------------------------------

def test_registry_blip_while_reading_the_champion_fails_and_moves_nothing(
        mlflow_store, tmp_path, monkeypatch):
    first_run, _, first = _stage2_run(tmp_path, seed=0)
    assert _evaluate(monkeypatch, first_run, _outcome(0.9)).exit_code == 0
    assert _champion() == first
    second_run, _, second = _stage2_run(tmp_path, seed=1)

    monkeypatch.setenv(PATIENCE_ENV, "0")
    with monkeypatch.context() as outage:  # reading the champion meets a server restart
        _blip(outage, MlflowClient, "get_model_version_by_alias", "get_registered_model")
        result = _evaluate(monkeypatch, second_run, _outcome(0.1))

    assert _champion() == first, \
        f"champion moved to version {_champion()} (score 0.1 < 0.9) while the registry was " \
        "unreachable"
    assert result.exit_code != 0
    assert "champion.verdict" not in MlflowClient().get_model_version(MODEL, second).tags


def _stage1_run(tmp_path: Path, checkpoint_tag: bool = True) -> str:
    """A finished, healthy-looking Stage 1 run with its checkpoint (no training)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("radiology-report-vlm") or \
        client.get_experiment(client.create_experiment("radiology-report-vlm"))
    run = client.create_run(experiment.experiment_id, tags={"pipeline.stage": "stage1"})
    run_id = run.info.run_id
    ckpt = save_checkpoint(tmp_path / run_id / "vision_bridge_final", {"w": torch.ones(2)},
                           {"stage": "stage1", "run_id": run_id})
    for key, value in {"lr": "1e-5", "objective": "vicreg", "profile": "tiny"}.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "final_train_loss", 2.0)
    for key in ("feature_std", "normalized_std", "effective_rank"):
        client.log_metric(run_id, f"health_{key}", 5.0)
    client.log_artifact(run_id, str(ckpt), "checkpoints")
    if checkpoint_tag:
        client.set_tag(run_id, "checkpoint.vision_bridge_final.sha256", sha256_file(ckpt))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_gate_download_outage_fails_the_gate_without_rejecting_the_run(
        mlflow_store, tmp_path, monkeypatch):
    from steps import validate

    run_id = _stage1_run(tmp_path)
    monkeypatch.setenv(PATIENCE_ENV, "0")
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", _unreachable)
    result = CliRunner().invoke(validate.main, ["--stage1_run", run_id, "--profile", "tiny"])

    tags = MlflowClient().get_run(run_id).data.tags
    assert tags.get("gate.verdict") is None, \
        f"a failed download rejected a healthy run for good: {tags.get('gate.reasons')}"
    assert result.exit_code != 0
    assert "unreachable" in result.stderr or "Connection refused" in result.stderr, result.output


def test_reject_stage1_during_an_outage_fails_loudly_and_tags_nothing(
        mlflow_store, tmp_path, monkeypatch):
    run_id = _stage1_run(tmp_path)
    with mlflow.start_run():
        ckpt = tmp_path / run_id / "vision_bridge_final.safetensors"
        version = promote_vision_bridge(ckpt, run_id, {"checkpoint_sha256": sha256_file(ckpt)})
    monkeypatch.setenv(PATIENCE_ENV, "0")
    with monkeypatch.context() as outage:
        outage.setattr(MlflowClient, "search_model_versions", _unreachable)
        with pytest.raises(MlflowException):
            reject_stage1(run_id, ["collapsed features"])
    client = MlflowClient()
    assert client.get_registered_model(VISION_MODEL).aliases.get(VISION_ALIAS) == version
    assert "gate.verdict" not in client.get_run(run_id).data.tags

    reject_stage1(run_id, ["collapsed features"])  # the registry answers again: it takes
    assert VISION_ALIAS not in client.get_registered_model(VISION_MODEL).aliases
    assert client.get_run(run_id).data.tags["gate.verdict"] == "rejected"


def test_unknown_source_run_still_reads_as_absent(mlflow_store):
    from pipeline.tracking.registry import run_verdict

    assert run_verdict("0" * 32) is None


# ---- two evaluations at once ---------------------------------------------------------------

_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from steps import evaluate
    from tests.test_registry_hardening import _outcome

    me, model, score, sync = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
    evaluate.evaluate_model = lambda *a, **k: _outcome(score)
    set_alias = MlflowClient.set_registered_model_alias


    def wait_for(path):
        deadline = time.monotonic() + 120
        while not path.exists():
            assert time.monotonic() < deadline, f"{me}: no {path.name}"
            time.sleep(0.05)


    def racing(self, name, alias, version):
        # Both have read the champion before either writes; `low` writes after `high` is done.
        if alias == "champion" and not racing.done:
            racing.done = True
            (sync / f"read_{me}").touch()
            wait_for(sync / ("read_low" if me == "high" else "read_high"))
            if me == "low":
                wait_for(sync / "go_low")
        return set_alias(self, name, alias, version)


    racing.done = False
    MlflowClient.set_registered_model_alias = racing
    evaluate.main(["--model", model, "--profile", "tiny", "--no-meteor"])
""")


@pytest.mark.slow  # two fresh interpreters
def test_two_concurrent_evaluations_leave_the_better_version_champion(mlflow_store, tmp_path):
    high_run, _, high = _stage2_run(tmp_path, seed=0)
    low_run, _, low = _stage2_run(tmp_path, seed=1)
    sync = tmp_path / "sync"
    sync.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {me: subprocess.Popen([sys.executable, str(script), me, run, score, str(sync)],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
             for me, run, score in (("high", high_run, "0.9"), ("low", low_run, "0.4"))}
    try:
        out_high, _ = procs["high"].communicate(timeout=300)
        assert procs["high"].returncode == 0, out_high[-3000:]
        (sync / "go_low").touch()
        out_low, _ = procs["low"].communicate(timeout=300)
        assert procs["low"].returncode == 0, out_low[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert _champion() == high, \
        f"champion -> version {_champion()} (score 0.4), not version {high} (score 0.9): the " \
        "lower score won the race"


def test_scores_decoded_with_another_beam_width_or_candidate_count_are_not_compared(
        mlflow_store, tmp_path, monkeypatch):
    first_run, _, first = _stage2_run(tmp_path, seed=0)
    beams3 = _outcome(0.9, "beam", num_beams=3, n_candidates=6)
    assert _evaluate(monkeypatch, first_run, beams3).exit_code == 0
    assert _champion() == first

    second_run, _, second = _stage2_run(tmp_path, seed=1)
    beams2 = _outcome(0.5, "beam", num_beams=2, n_candidates=5)
    assert _evaluate(monkeypatch, second_run, beams2).exit_code == 0
    client = MlflowClient()
    keys = [client.get_model_version(MODEL, v).tags["eval.key"] for v in (first, second)]
    assert keys[0] != keys[1], f"beam 3 x 6 candidates and beam 2 x 5 share the key {keys[0]}"
    assert _champion() == second  # a champion measured otherwise does not block

    third_run, _, third = _stage2_run(tmp_path, seed=2)
    more_samples = _outcome(0.4, "beam", num_beams=2, n_candidates=8)
    assert _evaluate(monkeypatch, third_run, more_samples).exit_code == 0
    assert client.get_model_version(MODEL, third).tags["eval.key"] != keys[1]


# ---- the decision is a value; its rules a list over a metrics dict --------------------------

def _passing_metrics() -> dict[str, float]:
    return {"finding_coarse_macro_f1": 0.9, "blind_finding_coarse_macro_f1": 0.2,
            "grounding_gap": 1.0, "score": 0.5, "bleu4": 0.4, "blind_bleu4": 0.1,
            "cider": 1.0, "blind_cider": 0.2, "report_form": 0.95, "reference_report_form": 1.0,
            "contradiction_share": 0.0, "preamble_share": 0.0, "chexpert_micro_f1": 0.6,
            "blind_chexpert_micro_f1": 0.3, "contradiction_share_as_written": 0.0,
            "repaired_share": 0.0, "retrieval_finding_coarse_macro_f1": 0.5,
            "retrieval_chexpert_micro_f1": 0.4}


def test_champion_rules_are_conditions_over_a_metrics_dict_and_extend_by_appending():
    from pipeline.config import ChampionConfig
    from pipeline.gate.champion import CHAMPION_RULES, ChampionRule, judge_champion

    cfg = ChampionConfig()
    assert judge_champion(_passing_metrics(), cfg).approved
    long_reports = ChampionRule("writes_long_reports", lambda m, c: m["mean_words"] >= 5,
                                lambda m, c: f"mean report length {m['mean_words']:g} < 5 words")
    rules = (*CHAMPION_RULES, long_reports)
    verdict = judge_champion({**_passing_metrics(), "mean_words": 2.0}, cfg, rules=rules)
    assert not verdict.approved
    assert verdict.reasons == ["mean report length 2 < 5 words"]
    missing = judge_champion(_passing_metrics(), cfg, rules=rules)
    assert not missing.approved and "mean_words" in missing.reasons[0], missing.reasons


def test_champion_outcome_is_a_frozen_value_and_names_the_evaluate_run(
        mlflow_store, tmp_path, monkeypatch):
    import dataclasses

    from pipeline.gate.champion import ChampionOutcome

    run_id, _, version = _stage2_run(tmp_path)
    result = _evaluate(monkeypatch, run_id, _outcome(0.5))
    assert result.exit_code == 0, result.output
    outcome = ChampionOutcome(version=version, moved=True, reasons=(), champion=version)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.moved = False
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`pipeline.stage` = 'evaluate'")
    assert run.info.run_name == "evaluate champion test"
    assert run.data.tags["champion.verdict"] == "approved"


@pytest.mark.parametrize("change, reason", [
    ({"bleu4": 0.09}, "BLEU-4 0.090 < the constant report's 0.100"),
    ({"cider": 0.1}, "CIDEr 0.100 < the constant report's 0.200"),
    ({"report_form": 0.5}, "report form 0.500 < 0.85 x the references' 1.000"),
    ({"contradiction_share": 0.25}, "25.0% of the reports assert and deny the same finding"),
    ({"preamble_share": 0.1}, "10.0% of the reports open as a chat assistant's answer"),
    ({"contradiction_share_as_written": 0.25},
     "25.0% of the reports contradict themselves as written, before any repair"),
    ({"repaired_share": 0.2}, "the contradiction repair edited 20.0% of the reports"),
    ({"chexpert_micro_f1": 0.35}, "CheXpert-14 micro F1 0.350 <= the retrieval baseline's 0.400"),
    ({"finding_coarse_macro_f1": 0.45},
     "coarse finding F1 0.450 <= the retrieval baseline's 0.500"),
])
def test_the_gate_refuses_text_that_does_not_read_as_reports_with_its_reason(change, reason):
    from pipeline.config import ChampionConfig
    from pipeline.gate.champion import judge_champion

    base = {**_passing_metrics(), "bleu4": 0.4, "blind_bleu4": 0.1}
    verdict = judge_champion({**base, **change}, ChampionConfig())
    assert not verdict.approved
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(reason), verdict.reasons


# ---- evaluating the champion itself; settling only among versions that raced ----------------

def test_re_evaluating_the_champion_with_the_same_result_confirms_it(
        mlflow_store, tmp_path, monkeypatch):
    run_id, _, version = _stage2_run(tmp_path)
    assert _evaluate(monkeypatch, run_id, _outcome(0.6)).exit_code == 0
    assert _champion() == version

    result = _evaluate(monkeypatch, run_id, _outcome(0.6))  # the same key, the same score
    assert result.exit_code == 0, result.output
    tags = MlflowClient().get_model_version(MODEL, version).tags
    assert _champion() == version
    assert tags["champion.verdict"] == "approved", \
        f"the champion is tagged {tags['champion.verdict']} ({tags['champion.reasons']}) " \
        "while the alias stays on it"
    assert "confirmed" in result.output, result.output


def test_re_evaluating_the_champion_that_now_fails_takes_the_alias_off_it(
        mlflow_store, tmp_path, monkeypatch):
    run_id, _, version = _stage2_run(tmp_path)
    assert _evaluate(monkeypatch, run_id, _outcome(0.6)).exit_code == 0
    failing = _outcome(0.6)
    failing.metrics["greedy_contradiction_share"] = 0.5
    result = _evaluate(monkeypatch, run_id, failing)
    assert result.exit_code == 0, result.output
    tags = MlflowClient().get_model_version(MODEL, version).tags
    assert tags["champion.verdict"] == "rejected"
    assert _champion() is None, "a rejected version kept the champion alias"
    assert "no longer passes" in result.output, result.output


def test_an_old_approved_version_measured_the_same_way_does_not_take_the_champion(
        mlflow_store, tmp_path, monkeypatch):
    old_run, _, old = _stage2_run(tmp_path, seed=0)  # approved long ago with key K, 0.9
    assert _evaluate(monkeypatch, old_run, _outcome(0.9)).exit_code == 0
    beam_run, _, beam = _stage2_run(tmp_path, seed=1)  # the champion, measured with K2
    assert _evaluate(monkeypatch, beam_run, _outcome(0.5, "beam", num_beams=3)).exit_code == 0
    assert _champion() == beam
    new_run, _, new = _stage2_run(tmp_path, seed=2)  # key K, approved: beam's is not comparable
    result = _evaluate(monkeypatch, new_run, _outcome(0.6))
    assert result.exit_code == 0, result.output
    assert _champion() == new, \
        f"champion -> version {_champion()}, which was not part of this evaluation: " \
        f"{result.output[-500:]}"
    assert "at the same time" not in result.output


# ---- Stage 2's init: an unreachable registry is not "no approved Stage 1" -------------------

def test_init_auto_during_a_registry_outage_fails_loudly_instead_of_training_from_scratch(
        mlflow_store, monkeypatch):
    from pipeline.stage2.init import choose_init

    monkeypatch.setenv(PATIENCE_ENV, "0")
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", _unreachable)
    monkeypatch.setattr(MlflowClient, "get_registered_model", _unreachable)
    with pytest.raises(MlflowException, match="Connection refused"):
        choice = choose_init("auto", "out")
        pytest.fail(f"an unreachable registry read as an empty one: {choice}")


def test_init_auto_against_a_closed_port_fails_loudly(monkeypatch, tmp_path):
    from pipeline.stage2.init import choose_init

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PATIENCE_ENV, "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # discard: nothing listens
    try:
        with pytest.raises(MlflowException):
            choice = choose_init("auto", "out")
            pytest.fail(f"an unreachable registry read as an empty one: {choice}")
    finally:
        mlflow.set_tracking_uri(None)


def test_init_auto_with_no_approved_stage1_still_starts_fresh(mlflow_store):
    from pipeline.stage2.init import choose_init

    assert choose_init("auto", "out").source == "scratch"
    client = MlflowClient()
    client.create_registered_model(VISION_MODEL)  # the model exists, the alias does not
    assert choose_init("auto", "out").source == "scratch"


def test_a_blip_while_downloading_the_approved_stage1_is_retried(
        mlflow_store, tmp_path, monkeypatch):
    from pipeline.stage2.init import choose_init

    run_id = _stage1_run(tmp_path)
    with mlflow.start_run():
        ckpt = tmp_path / run_id / "vision_bridge_final.safetensors"
        promote_vision_bridge(ckpt, run_id, {"checkpoint_sha256": sha256_file(ckpt)})
    monkeypatch.setenv(PATIENCE_ENV, "30")
    monkeypatch.setattr("pipeline.tracking.outage.time.sleep", lambda s: None)
    _blip(monkeypatch, mlflow.artifacts, "download_artifacts")
    assert choose_init("auto", "out").source == "registry"


def test_after_the_champion_is_taken_off_an_earlier_approved_version_does_not_return(
        mlflow_store, tmp_path, monkeypatch):
    first_run, _, first = _stage2_run(tmp_path, seed=0)  # approved with no champion: 0.9
    assert _evaluate(monkeypatch, first_run, _outcome(0.9)).exit_code == 0
    second_run, _, second = _stage2_run(tmp_path, seed=1)
    assert _evaluate(monkeypatch, second_run, _outcome(0.95)).exit_code == 0
    assert _champion() == second
    failing = _outcome(0.95)
    failing.metrics["greedy_contradiction_share"] = 0.5
    assert _evaluate(monkeypatch, second_run, failing).exit_code == 0
    assert _champion() is None
    third_run, _, third = _stage2_run(tmp_path, seed=2)  # finds no champion, as `first` did
    result = _evaluate(monkeypatch, third_run, _outcome(0.5))
    assert result.exit_code == 0, result.output
    assert _champion() == third, \
        f"champion -> version {_champion()}, approved before the vacancy: {result.output[-400:]}"
