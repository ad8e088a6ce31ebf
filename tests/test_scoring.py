"""Report scoring on hand-written chest X-ray reports: perfect, shuffled, constant, empty."""
from __future__ import annotations

import logging
import math
import shutil

import pytest

from pipeline.evaluate import scoring
from pipeline.evaluate.scoring import (DEFAULT_SCORE_WEIGHTS, clean_report, composite_score,
                              distinct_share, finding_scores, nlg_scores, per_finding_f1_figure,
                              score_reports)

# Twelve distinct reports over most findings, with negations, sides, zones and three normals
# placed so that no two neighbours share their labels (the rotation below is a derangement).
REPORTS = [
    "The heart is enlarged. Small left pleural effusion. No pneumothorax.",
    "Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "Large right pneumothorax with partial collapse of the right lung. No effusion.",
    "Cardiomegaly. Bilateral pleural effusions, larger on the right.",
    "There is a 12 mm nodule in the right upper zone. No consolidation. Heart size normal.",
    "Consolidation in the left lower lobe, consistent with pneumonia. No effusion.",
    "No acute cardiopulmonary abnormality. Normal heart size and clear lungs.",
    "Moderate right pleural effusion. The cardiac silhouette is enlarged. No pneumothorax seen.",
    "Small left apical pneumothorax. Lungs otherwise clear. No pleural effusion.",
    "Patchy airspace opacity in the right middle zone. Mass in the left upper zone.",
    "Stable mild cardiomegaly. Left basal consolidation. Trace right pleural effusion.",
    "Clear lungs without focal consolidation. No pneumothorax. Prior right effusion has resolved.",
]
SHUFFLED = REPORTS[1:] + REPORTS[:1]
CONSTANT = [REPORTS[0]] * len(REPORTS)


@pytest.fixture(scope="module")
def scores():
    """Scores (METEOR off: its JVM takes 10-20 s to start) of the three hypothesis sets."""
    return {name: score_reports(REPORTS, hyps, meteor=False)
            for name, hyps in (("self", REPORTS), ("shuffled", SHUFFLED), ("constant", CONSTANT))}


def test_clean_report_follows_r2gen_and_is_idempotent():
    cleaned = clean_report("The heart is enlarged.  Small LEFT pleural effusion;\nno pneumothorax.")
    assert cleaned == "the heart is enlarged . small left pleural effusion no pneumothorax ."
    assert clean_report(cleaned) == cleaned
    assert clean_report("") == clean_report("  ... ") == "."


def test_references_against_themselves_score_perfectly(scores):
    s = scores["self"]
    assert all(s[f"bleu{n}"] > 0.999 for n in range(1, 5))
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["finding_macro_f1"] == s["finding_micro_f1"] == 1.0
    assert s["distinct_share"] == 1.0 and s["n_reports"] == len(REPORTS)
    assert math.isnan(s["meteor"])


def test_shuffled_references_score_much_lower(scores):
    s, shuffled = scores["self"], scores["shuffled"]
    for key in ("bleu4", "cider", "rouge_l", "finding_macro_f1", "finding_micro_f1"):
        assert shuffled[key] < 0.6 * s[key], key
    assert composite_score(shuffled) < 0.6 * composite_score(s)
    assert shuffled["distinct_share"] == 1.0


def test_constant_report_has_no_diversity_and_lower_finding_f1(scores):
    s, constant = scores["self"], scores["constant"]
    assert constant["distinct_share"] == pytest.approx(1 / len(REPORTS))
    assert constant["finding_macro_f1"] < 0.6 * s["finding_macro_f1"]
    assert composite_score(constant) < 0.6 * composite_score(s)
    assert distinct_share([" A  report", "a REPORT "]) == 0.5


@pytest.mark.parametrize("empty", [range(len(REPORTS)), [0, 5, 11]], ids=["all", "some"])
def test_empty_hypotheses_score_without_crashing(empty):
    hyps = ["" if i in empty else r for i, r in enumerate(REPORTS)]
    s = score_reports(REPORTS, hyps, meteor=False)
    for key in ("bleu1", "bleu4", "rouge_l", "cider", "finding_macro_f1", "finding_micro_f1"):
        assert math.isfinite(s[key]) and s[key] >= 0, key
    assert all(0 <= s[f"bleu{n}"] <= 1 for n in range(1, 5))
    assert s["bleu4"] < 0.9


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_is_a_probability_when_java_exists():
    perfect = nlg_scores(REPORTS, REPORTS)["meteor"]
    hyps = ["" if i % 4 == 0 else r for i, r in enumerate(SHUFFLED)]
    partial = nlg_scores(REPORTS, hyps)["meteor"]  # reuses the running METEOR process
    assert isinstance(perfect, float) and isinstance(partial, float)
    assert perfect > 0.99 and 0.0 <= partial < 0.5 * perfect


def test_missing_java_gives_nan_meteor_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(scoring.shutil, "which", lambda name: None)
    scoring._warn_once.cache_clear()  # an earlier test may have warned already
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.scoring"):
        first = nlg_scores(REPORTS[:3], REPORTS[:3])
        second = nlg_scores(REPORTS[:3], REPORTS[1:4])
    assert math.isnan(first["meteor"]) and math.isnan(second["meteor"])
    assert first["bleu4"] > 0.999
    assert sum("java" in r.getMessage() for r in caplog.records) == 1


def test_finding_absent_on_both_sides_is_left_out_of_the_macro_average():
    refs = ["The heart is enlarged. No effusion.", "Small left pleural effusion."]
    hyps = ["The heart is enlarged. Small right pleural effusion.", "No pneumothorax."]
    s = finding_scores(refs, hyps)
    assert s["finding_f1/cardiomegaly"] == 1.0
    assert s["finding_f1/effusion_right"] == s["finding_precision/effusion_right"] == 0.0
    assert s["finding_recall/effusion_right"] == 0.0  # no reference has it: 0/0 counts as 0
    assert s["finding_f1/effusion_left"] == s["finding_precision/effusion_left"] == 0.0
    assert math.isnan(s["finding_f1/pneumothorax_right"])
    # scored: cardiomegaly 1, effusion_right 0, effusion_left 0, no_finding 0 (hyp 2 has none)
    assert s["finding_n_scored"] == 4
    assert s["finding_macro_f1"] == pytest.approx(0.25)
    assert s["finding_micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))  # tp 1, fp 2, fn 1


def test_composite_score_is_a_weighted_sum_that_refuses_missing_or_nan():
    assert dict(DEFAULT_SCORE_WEIGHTS) == {"finding_coarse_macro_f1": 0.5, "bleu4": 0.25,
                                           "cider": 0.25}
    with pytest.raises(TypeError):
        DEFAULT_SCORE_WEIGHTS["meteor"] = 1.0
    assert composite_score({"finding_coarse_macro_f1": 0.5, "bleu4": 0.2, "cider": 0.6,
                            "meteor": 9.0}) == pytest.approx(0.45)
    assert composite_score({"bleu4": 0.2, "meteor": 0.3}, {"meteor": 2.0}) == pytest.approx(0.6)
    with pytest.raises(KeyError, match="cider"):
        composite_score({"bleu4": 0.2})
    with pytest.raises(ValueError, match="meteor"):
        composite_score({"meteor": math.nan}, {"meteor": 1.0})


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        score_reports(REPORTS[:2], REPORTS[:1], meteor=False)
    with pytest.raises(ValueError):
        finding_scores([], [])


def test_per_finding_f1_figure_writes_a_png(scores, tmp_path):
    path = per_finding_f1_figure(scores["shuffled"], tmp_path / "plots" / "finding_f1.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
