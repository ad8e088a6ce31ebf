"""Grounding on the tiny profile: a model that ignores the image is flagged and refused as
champion; one whose reports are decided by the image reads it and is promoted.

The LLM is the tiny random LM briefly trained to write each report after its findings prompt
(the `grounded_llm` fixture): a random LM cannot be steered by anything, so it would show
nothing either way."""
from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from steps import evaluate, stage2
from tests.grounded_data import write_dataset

FAST = ["--profile", "tiny", "--no-meteor", "--num_beams", "1"]


def _train_and_evaluate(data, llm):
    result = CliRunner().invoke(stage2.main, [
        "--profile", "tiny", "--init", "scratch", "--data", str(data), "--llm", str(llm),
        "--epochs", "3", "--lr", "1e-2", "--encoder_lr", "same"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    candidate = client.get_model_version_by_alias("report-vlm", "candidate")
    s2 = client.get_run(candidate.tags["source_run"])
    result = CliRunner().invoke(evaluate.main, ["--model", s2.info.run_id, "--data", str(data),
                                                *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (ev,) = client.search_runs([s2.info.experiment_id], "tags.`pipeline.stage` = 'evaluate'")
    return s2, ev, result.output


def test_images_without_information_are_flagged_and_refused(mlflow_store, tmp_path, grounded_llm):
    s2, ev, output = _train_and_evaluate(write_dataset(tmp_path / "blind", informative=False),
                                         grounded_llm)
    assert s2.data.tags.get("stage2.image_ignored") == "true"
    assert "image ignored" in s2.data.tags["stage2.curve_verdict"]
    assert abs(s2.data.metrics["val_grounding_gap"]) < 1e-6  # identical images: no gap at all
    assert ev.data.tags["champion.verdict"] == "rejected"
    assert "grounding gap" in ev.data.tags["champion.reasons"]
    assert "champion unchanged" in output and "rejected" in output
    assert ev.info.run_name == "evaluate rejected test"
    versions = MlflowClient().search_model_versions("name='report-vlm'")
    assert all(v.aliases == [] or "champion" not in v.aliases for v in versions)


def test_reports_decided_by_the_image_are_read_and_promoted(mlflow_store, tmp_path, grounded_llm):
    s2, ev, output = _train_and_evaluate(write_dataset(tmp_path / "seen", informative=True),
                                         grounded_llm)
    assert s2.data.tags.get("stage2.image_ignored") is None
    metrics = ev.data.metrics
    assert metrics["grounding_gap"] >= 0.05, metrics
    assert metrics["greedy_finding_coarse_macro_f1"] >= \
        metrics["blind_finding_coarse_macro_f1"] + 0.1, metrics
    # The classifier that writes the prompt, scored alone, and the report's share of it.
    assert metrics["head_finding_coarse_macro_f1"] >= \
        metrics["blind_finding_coarse_macro_f1"] + 0.1, metrics
    assert metrics["report_over_head_coarse_f1"] == pytest.approx(
        metrics["greedy_finding_coarse_macro_f1"] / metrics["head_finding_coarse_macro_f1"])
    assert ev.data.tags["champion.verdict"] == "approved", ev.data.tags.get("champion.reasons")
    champion = MlflowClient().get_model_version_by_alias("report-vlm", "champion")
    assert champion.tags["source_run"] == s2.info.run_id
    assert float(champion.tags["eval.grounding_gap"]) >= 0.05
    assert mlflow.artifacts.load_dict(f"runs:/{ev.info.run_id}/champion_verdict.json")["approved"]
    # What the UI shows: runs named by stage and verdict, the scores on the version's page.
    assert ev.info.run_name == "evaluate champion test"
    assert s2.info.run_name.startswith("stage2 findings lr=0.01 init=scratch")
    assert "grounding gap" in champion.description and "blind baseline" in champion.description
    assert "generated:" in champion.description


def test_image_ignored_rule_judges_a_run_shorter_than_its_window_by_all_its_epochs():
    """`ignored_epochs` 2 on a 1-epoch run (the demo's): the one epoch decides; on a longer run
    one low epoch after a good one is not enough."""
    from types import SimpleNamespace

    from pipeline import config as C
    from pipeline.stage2.trainer import Stage2Trainer

    def ignored(epochs, gaps):
        cfg = C.build(C.Stage2Config, "tiny", {"epochs": epochs})
        history = {"val_grounding_gap": list(enumerate(gaps, start=1))}
        return Stage2Trainer._image_ignored(SimpleNamespace(cfg=cfg, epoch_history=history))

    assert C.Stage2Config().ignored_epochs == 2
    assert ignored(1, [0.001]) and not ignored(1, [0.5])
    assert not ignored(3, [0.001]) and not ignored(3, [0.5, 0.001])
    assert ignored(3, [0.5, 0.001, 0.001])



def test_the_beam_that_writes_the_given_findings_is_chosen_ties_go_to_the_better_beam():
    from pipeline.data.labeler import FINDINGS
    from pipeline.models.report_model import choose_reports, disagreement

    given = dict.fromkeys(FINDINGS, 0) | {"cardiomegaly": 1, "effusion_left": 1}
    normal = dict.fromkeys(FINDINGS, 0) | {"no_finding": 1}
    beams = ["Cardiomegaly.",  # misses the effusion
             "The heart is enlarged. Small left pleural effusion.",  # writes both
             "Cardiomegaly. Left pleural effusion."]  # writes both, a worse beam
    assert disagreement(beams[0], given) == (1, 1)
    assert disagreement(beams[1], given) == (0, 0)
    clear = ["The lungs are clear.", "No acute cardiopulmonary abnormality."]
    assert choose_reports([beams, clear], [given, normal]) == [beams[1], clear[0]]
    # Without findings (or when asked not to) the top beam is written.
    assert choose_reports([beams, clear], None) == [beams[0], clear[0]]
    assert choose_reports([beams], [given], by_findings=False) == [beams[0]]


def test_candidates_are_the_beams_then_seeded_samples_and_the_caller_rng_is_untouched(
        grounded_llm):
    import torch

    from pipeline import config as C
    from pipeline.models.llm_loading import load_llm
    from pipeline.models.report_model import generate_candidates
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage2Config, "tiny")
    llm = load_llm(str(grounded_llm))
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, llm.hidden_size)
    images = torch.randn(3, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    args = (model, llm, images, cfg.prompt, 6)
    first, given = generate_candidates(*args, num_beams=2, findings=True, samples=3, seed=5)
    assert torch.rand(1) == before  # sampling ran in its own random state
    again, _ = generate_candidates(*args, num_beams=2, findings=True, samples=3, seed=5)
    beams, _ = generate_candidates(*args, num_beams=2, findings=True)
    assert [len(row) for row in first] == [5, 5, 5] and len(given) == 3
    assert first == again  # seeded: the same images give the same candidates
    assert [row[:2] for row in first] == beams  # the beams first, best first
