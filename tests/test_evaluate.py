"""`evaluate` on the tiny profile: what it logs, and when it moves `report-vlm@champion`."""
from __future__ import annotations

import sys

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from steps import evaluate, stage2
from tests.grounded_data import write_dataset

MODEL = "report-vlm"
FAST = ["--profile", "tiny", "--no-meteor"]


@pytest.fixture()
def grounded(tmp_path, grounded_llm, monkeypatch):
    """Train and evaluate on a tiny dataset whose reports the image decides (see
    tests/grounded_data.py), so the champion gate's grounding rules can pass."""
    data = str(write_dataset(tmp_path / "data", informative=True, n_eval=4))
    monkeypatch.setattr(sys.modules[__name__], "DATA", ["--data", data])
    monkeypatch.setattr(sys.modules[__name__], "TRAIN", [
        "--data", data, "--llm", str(grounded_llm), "--epochs", "2", "--lr", "1e-2",
        "--encoder_lr", "same"])


DATA: list[str] = []
TRAIN: list[str] = []


def _train(*args: str) -> tuple[str, str]:
    """A tiny Stage 2 run from scratch; (run id, the `report-vlm` version it registered)."""
    result = CliRunner().invoke(stage2.main, ["--profile", "tiny", "--init", "scratch", *TRAIN,
                                              *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    candidate = MlflowClient().get_model_version_by_alias(MODEL, "candidate")
    return candidate.tags["source_run"], candidate.version


def _evaluate(model: str, *args: str) -> tuple[str, float]:
    """Run `evaluate` in-process; (its run id, its logged `score`)."""
    client = MlflowClient()
    before = {r.info.run_id for r in _evaluate_runs(client)}
    result = CliRunner().invoke(evaluate.main, ["--model", model, *FAST, *DATA, *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = [r for r in _evaluate_runs(client) if r.info.run_id not in before]
    return run.info.run_id, run.data.metrics["score"]


def _evaluate_runs(client: MlflowClient) -> list:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, "tags.`pipeline.stage` = 'evaluate'")


def _champion() -> str:
    return MlflowClient().get_model_version_by_alias(MODEL, "champion").version


def _eval_score_tag(version: str) -> float:
    return float(MlflowClient().get_model_version(MODEL, version).tags["eval.score"])


def test_evaluate_logs_scores_table_and_plot_and_crowns_the_first_champion(mlflow_store, grounded):
    source_run, version = _train()
    client = MlflowClient()
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL, "champion")  # nothing evaluated yet

    run_id, score = _evaluate(source_run, "--num_beams", "2")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.stage"] == "evaluate"
    assert run.data.tags["eval.source_run"] == source_run
    assert run.data.params["source_run"] == source_run
    metrics = run.data.metrics
    for key in ("greedy_bleu4", "beam_bleu4", "greedy_finding_macro_f1",
                "greedy_distinct_share", "beam_distinct_share", "score",
                "beam_chexpert_micro_f1", "beam_ce_rule_micro14_f1", "beam_ce_rule_macro14_f1",
                "beam_ce_rule_micro5_f1", "greedy_ce_rule_example14_f1",
                "blind_ce_rule_micro5_f1",
                # faithfulness to the prompt, as written, and the retrieval baseline
                "greedy_prompt_recall", "beam_prompt_precision",
                "greedy_contradiction_share_as_written", "beam_contradiction_share_as_written",
                "beam_repaired_share", "greedy_invented_size_share",
                "greedy_report_over_head_coarse_f1", "retrieval_chexpert_micro_f1",
                "retrieval_finding_coarse_macro_f1", "retrieval_bleu4", "bleu4_over_retrieval"):
        assert key in metrics, f"{key} not logged; got {sorted(metrics)}"
    assert 0.0 <= metrics["greedy_distinct_share"] <= 1.0
    assert 0.0 <= metrics["greedy_finding_macro_f1"] <= 1.0

    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/reports.json")
    columns = table["columns"]
    assert {"id", "reference", "generated_greedy", "generated_beam", "retrieval"} <= set(columns)
    rows = [dict(zip(columns, row)) for row in table["data"]]
    assert len(rows) == 4  # the test split
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["generated_greedy"], str) and isinstance(r["generated_beam"], str)
               and r["reference"].strip() for r in rows)

    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/eval_scores.json")["score"] == \
        pytest.approx(score)
    artifacts = {f.path for f in client.list_artifacts(run_id, "plots")}
    assert "plots/finding_f1.png" in artifacts
    png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/finding_f1.png")
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    assert _champion() == version
    assert _eval_score_tag(version) == pytest.approx(score, abs=1e-6)
    # The registered model's page names the champion and what its evaluation found.
    page = client.get_registered_model(MODEL).description
    assert page.startswith(f"**champion: version {version}**"), page
    assert "champion gate: **approved**" in page and "grounding gap: " in page, page
    assert "sample report: " in page, page
    # The version's page: the retrieval baseline beside the model, the text as written.
    description = client.get_model_version(MODEL, version).description
    assert "| retrieval baseline |" in description and "prompt recall" in description, \
        description


def test_champion_moves_only_on_a_strictly_higher_score(mlflow_store, grounded):
    first_run, first = _train()
    _, first_score = _evaluate(first_run, "--num_beams", "1")
    assert _champion() == first

    second_run, second = _train("--seed", "1")
    assert second != first
    _, second_score = _evaluate(f"models:/{MODEL}@candidate", "--num_beams", "1")
    # Whatever the numbers: the tags hold each version's score, the champion holds the best,
    # and a tie keeps the earlier champion.
    assert _eval_score_tag(first) == pytest.approx(first_score, abs=1e-6)
    assert _eval_score_tag(second) == pytest.approx(second_score, abs=1e-6)
    tags = [MlflowClient().get_model_version(MODEL, v).tags["eval.score"] for v in (first, second)]
    assert _champion() == (second if second_score > first_score else first), \
        f"scores {first_score!r} (v{first}) / {second_score!r} (v{second}), eval.score tags {tags}"

    # Force both branches: the challenger is the version that is not champion now.
    champion = _champion()
    challenger_run, challenger = (second_run, second) if champion == first else (first_run, first)
    client = MlflowClient()

    client.set_model_version_tag(MODEL, champion, "eval.score", "-1.0")
    _evaluate(challenger_run, "--num_beams", "1", "--limit", "2")
    assert _champion() == champion, "a partial evaluation (--limit) must not promote"

    client.set_model_version_tag(MODEL, champion, "eval.score", "1000000.0")
    _, challenger_score = _evaluate(challenger_run, "--num_beams", "1")
    assert _champion() == champion, "a lower score must not take the champion"
    assert _eval_score_tag(challenger) == pytest.approx(challenger_score, abs=1e-6)

    client.set_model_version_tag(MODEL, champion, "eval.score", repr(challenger_score))
    _, again = _evaluate(challenger_run, "--num_beams", "1")
    assert again == challenger_score  # greedy decoding on a CPU is deterministic
    assert _champion() == champion, "an equal score must not take the champion"

    client.set_model_version_tag(MODEL, champion, "eval.score", "-1.0")
    _evaluate(challenger_run, "--num_beams", "1")
    assert _champion() == challenger, "a strictly higher score must take the champion"


@pytest.mark.parametrize("model", ["0123456789abcdef0123456789abcdef",
                                   f"models:/{MODEL}@no-such-alias",
                                   "runs:/0123456789abcdef0123456789abcdef/checkpoints",
                                   "missing/vision_bridge_vlm_final.safetensors"])
def test_bad_model_reference_exits_nonzero_with_one_error_line(mlflow_store, model):
    result = CliRunner().invoke(evaluate.main, ["--model", model, *FAST])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert not _evaluate_runs(MlflowClient()), "a refused model reference must not open a run"


@pytest.mark.parametrize("suffix", ["/checkpoints", "/checkpoints/"])
def test_runs_uri_resolves_to_the_final_checkpoint_like_the_registered_version(
        mlflow_store, tmp_path, suffix):
    import mlflow
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.tracking.registry import resolve_stage2_checkpoint

    with mlflow.start_run() as run:
        for kind in ("best_val", "final"):
            path = save_checkpoint(tmp_path / f"vision_bridge_vlm_{kind}", {"w": torch.ones(1)},
                                   {"stage": "stage2", "run_id": run.info.run_id, "kind": kind})
            mlflow.log_artifact(str(path), "checkpoints")
    path, source = resolve_stage2_checkpoint(f"runs:/{run.info.run_id}{suffix}")
    assert path.name == "vision_bridge_vlm_final.safetensors"
    assert source == run.info.run_id
