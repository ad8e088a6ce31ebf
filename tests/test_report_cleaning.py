"""The R2Gen family's report cleaning, applied before the NLG metrics and named in the run."""
from __future__ import annotations

import pytest

from pipeline.data.report_cleaning import (CLEANERS, DEFAULT_CLEANING, clean_report_iu_xray,
                                               clean_report_mimic_cxr, cleaner)
from pipeline.evaluate.scoring import nlg_scores


def test_numbering_case_and_punctuation_go():
    text = "1. The heart is NORMAL in size. 2. No effusion; no pneumothorax (resolved)!"
    assert clean_report_mimic_cxr(text) == \
        "the heart is normal in size . no effusion no pneumothorax resolved ."
    assert clean_report_iu_xray(text) == clean_report_mimic_cxr(text)


def test_line_breaks_end_sentences_only_in_the_mimic_variant():
    text = "Heart enlarged.\nNo effusion."
    assert clean_report_mimic_cxr(text) == "heart enlarged . no effusion ."
    assert clean_report_iu_xray(text) == "heart enlarged no effusion ."


@pytest.mark.parametrize("name", sorted(CLEANERS))
def test_cleaning_is_idempotent_and_never_empty(name):
    clean = cleaner(name)
    for text in ["", " ... ", "XXXX. Lungs clear... Heart size: normal (stable)."]:
        once = clean(text)
        assert once and clean(once) == once


def test_metrics_score_cleaned_text_and_unknown_cleaning_is_refused():
    raw = ["The heart is enlarged. No effusion."]
    shouted = ["THE HEART IS ENLARGED.  NO EFFUSION!!"]
    assert nlg_scores(raw, shouted, meteor=False)["bleu4"] > 0.99
    assert DEFAULT_CLEANING in CLEANERS
    with pytest.raises(ValueError, match="unknown report cleaning"):
        nlg_scores(raw, shouted, meteor=False, cleaning="ptb")
