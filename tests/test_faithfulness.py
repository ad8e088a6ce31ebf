"""Faithfulness to the prompt, counted on the text as written; the retrieval baseline; the
champion rules that judge both."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipeline.config import ChampionConfig
from pipeline.data.labeler import label_report
from pipeline.evaluate.faithfulness import (faithfulness_scores, invented_sizes, prompt_counts,
                                            sized_groups)
from pipeline.evaluate.retrieval import retrieve_reports
from pipeline.gate.champion import judge_champion

TRAIN = ["There is a 12 mm nodule in the right upper zone. The heart is normal in size.",
         "Cardiomegaly. Small left pleural effusion.",
         "The heart is enlarged. There is a small left pleural effusion. No pneumothorax.",
         "A pacemaker is present. Lungs are clear.",
         "Lungs are clear."]


def _labels(**present: int) -> dict[str, int]:
    labels = dict.fromkeys(label_report("Lungs are clear."), 0)
    labels.update(present)
    labels["no_finding"] = int(not present)
    return labels


def test_prompt_recall_needs_the_side_the_prompt_gives_and_precision_counts_extra_findings():
    given = _labels(cardiomegaly=1, effusion_left=1)
    # The effusion is stated without its side: the prompt's left effusion is not stated; the
    # unplaced effusion is one the prompt named; the pneumothorax it did not name.
    assert prompt_counts("Cardiomegaly. There is a pleural effusion. Right pneumothorax.",
                         given) == (1, 2, 2, 3)
    assert prompt_counts("Cardiomegaly. Small left pleural effusion.", given) == (2, 2, 2, 2)
    assert prompt_counts("Small right pleural effusion.", given) == (0, 2, 0, 1)


def test_faithfulness_is_pooled_over_the_split_and_reads_the_text_as_given():
    given = [_labels(cardiomegaly=1, effusion_left=1), _labels()]
    written = ["Cardiomegaly without pleural effusion. Small left pleural effusion.",
               "The heart is enlarged. No pneumothorax."]
    scores = faithfulness_scores(written, given, frozenset({"nodule"}))
    assert scores["prompt_recall"] == pytest.approx(2 / 2)
    assert scores["prompt_precision"] == pytest.approx(2 / 3)  # the second report's heart
    assert scores["contradiction_share_as_written"] == pytest.approx(1 / 2)
    assert scores["invented_size_share"] == 0.0
    # Without a finding head there is no prompt to be faithful to.
    assert set(faithfulness_scores(written, None, frozenset())) == \
        {"contradiction_share_as_written", "invented_size_share"}
    # Nothing named and nothing stated: nothing to count.
    empty = faithfulness_scores(["Lungs are clear."], [_labels()], frozenset())
    assert math.isnan(empty["prompt_recall"]) and math.isnan(empty["prompt_precision"])


def test_invented_sizes_are_sizes_on_groups_the_training_references_never_size():
    sized = sized_groups(TRAIN)
    assert sized == {"nodule"}
    assert invented_sizes("A 2.5-cm pacemaker is located in the right upper zone.", sized) == \
        ["devices"]
    # The size belongs to its own clause's finding.
    assert invented_sizes("Cardiomegaly with a 3 cm left pleural effusion.", sized) == \
        ["effusion"]
    assert invented_sizes("A 3 cm nodule in the left lower zone. Cardiomegaly.", sized) == []
    # A group the training references size is not invented elsewhere.
    assert invented_sizes("A 2 cm pacemaker.", sized_groups([*TRAIN, "A 4 cm pacemaker."])) == []
    written = ["A 2.5-cm pacemaker is located in the right upper zone.", "Cardiomegaly."]
    assert faithfulness_scores(written, None, sized)["invented_size_share"] == 0.5


def test_retrieval_takes_the_training_report_nearest_to_the_head_and_the_shortest_on_ties():
    cardio_left = _labels(cardiomegaly=1, effusion_left=1)
    # Two training reports carry exactly these findings: the shorter one.
    assert retrieve_reports(TRAIN, [cardio_left]) == ["Cardiomegaly. Small left pleural effusion."]
    # No finding: "Lungs are clear." (shorter than the pacemaker's report, which differs anyway).
    assert retrieve_reports(TRAIN, [_labels()]) == ["Lungs are clear."]
    # No exact match: the fewest coarse groups apart (cardiomegaly + effusion, effusion side off
    # by one fine label) beats a report that misses a whole group.
    right = _labels(cardiomegaly=1, effusion_right=1)
    assert retrieve_reports(TRAIN, [right]) == ["Cardiomegaly. Small left pleural effusion."]
    assert retrieve_reports(TRAIN, [_labels(devices_pacemaker=1)]) == \
        ["A pacemaker is present. Lungs are clear."]


def test_the_evaluation_counts_faithfulness_before_the_repair(monkeypatch):
    """What the model serves is repaired; what is judged as written is the chosen report
    before the repair."""
    from pipeline.evaluate import evaluation

    report = "Cardiomegaly without pleural effusion. Small left pleural effusion."
    given = [_labels(cardiomegaly=1, effusion_left=1)]
    monkeypatch.setattr(evaluation, "ImageReportDataset", lambda records, size: list(records))
    monkeypatch.setattr(evaluation, "collate", lambda items: {"images": None})
    model = SimpleNamespace(
        cfg=SimpleNamespace(encoder=SimpleNamespace(image_size=8), choose_by_findings=True,
                            resolve_contradictions=True),
        style=None, candidates=lambda images, num_beams, max_new_tokens: ([[report]], given))
    run = evaluation._generate_all(model, ["s0"], 1, None)
    assert run.as_written == [report]
    assert run.written == ["Cardiomegaly. Small left pleural effusion."]
    assert run.repaired_share == 1.0
    scores = faithfulness_scores(run.as_written, run.given, frozenset())
    assert scores["contradiction_share_as_written"] == 1.0


# ---- the champion rules on the text as written and on the retrieval baseline ---------------

def _metrics(**change: float) -> dict[str, float]:
    """A model that passes every rule: findings, text and the served reports' consistency."""
    return {"finding_coarse_macro_f1": 0.78, "blind_finding_coarse_macro_f1": 0.2,
            "grounding_gap": 0.3, "score": 0.5, "bleu4": 0.22, "blind_bleu4": 0.157,
            "cider": 0.83, "blind_cider": 0.385, "report_form": 0.99,
            "reference_report_form": 1.0, "contradiction_share": 0.0, "preamble_share": 0.0,
            "chexpert_micro_f1": 0.73, "blind_chexpert_micro_f1": 0.307,
            "contradiction_share_as_written": 0.05, "repaired_share": 0.05,
            "retrieval_finding_coarse_macro_f1": 0.7, "retrieval_chexpert_micro_f1": 0.65,
            **change}


def test_the_gate_refuses_text_that_contradicts_itself_as_written_in_over_a_tenth():
    assert judge_champion(_metrics()).approved
    assert judge_champion(_metrics(contradiction_share_as_written=0.10,
                                   repaired_share=0.10)).approved
    # The demo's v1 champion: no contradiction left once repaired, 39% as written.
    verdict = judge_champion(_metrics(contradiction_share_as_written=0.39, repaired_share=0.39))
    assert not verdict.approved
    assert verdict.reasons == [
        "39.0% of the reports contradict themselves as written, before any repair (at most 10%)",
        "the contradiction repair edited 39.0% of the reports (at most 10%)"]
    failed = {r.name for r in verdict.rules if not r.passed}
    assert failed == {"no_self_contradiction_as_written", "seldom_repaired"}
    # One switch turns both rules off; the served text is still judged.
    off = ChampionConfig(judge_as_written=False)
    assert judge_champion(_metrics(contradiction_share_as_written=0.39, repaired_share=0.39),
                          off).approved
    assert not judge_champion(_metrics(contradiction_share=0.05), off).approved
    # Not measured is not passed.
    missing = _metrics()
    del missing["contradiction_share_as_written"]
    assert "contradiction_share_as_written was not measured" in \
        judge_champion(missing).reasons[0]


def test_the_gate_requires_beating_the_retrieval_baseline_on_both_finding_scores():
    tie = judge_champion(_metrics(retrieval_chexpert_micro_f1=0.73))
    assert not tie.approved
    assert tie.reasons == ["CheXpert-14 micro F1 0.730 <= the retrieval baseline's 0.730"]
    worse = judge_champion(_metrics(retrieval_finding_coarse_macro_f1=0.79))
    assert worse.reasons == ["coarse finding F1 0.780 <= the retrieval baseline's 0.790"]
    # Perfect findings cannot be beaten: a tie at 1.0 passes.
    assert judge_champion(_metrics(finding_coarse_macro_f1=1.0, chexpert_micro_f1=1.0,
                                   retrieval_finding_coarse_macro_f1=1.0,
                                   retrieval_chexpert_micro_f1=1.0)).approved
    # A model without a finding head has no retrieval baseline: refused unless switched off.
    headless = {k: v for k, v in _metrics().items() if not k.startswith("retrieval_")}
    assert not judge_champion(headless).approved
    off = ChampionConfig(judge_retrieval=False)
    assert judge_champion(headless, off).approved
    assert {r.name for r in judge_champion(headless, off).rules}.isdisjoint(
        {"beats_retrieval_chexpert", "beats_retrieval_coarse"})
