"""Report cleaning before NLG metrics, as the R2Gen family scores (R2Gen, R2GenCMN, R2GenGPT).

BLEU, METEOR, ROUGE-L and CIDEr in those papers are computed on cleaned text: lower-cased, list
numbering ("1. ", " 2. " .. " 5. ") removed, most punctuation stripped, sentences joined by
" . " and ended by " .". Scores computed on raw text are not comparable with their tables.

Two variants, named as the runs log them (`text_cleaning`):
- `r2gen_mimic_cxr` (the default): newlines become spaces first, so a sentence ending at a
  line break is still a sentence (MIMIC-CXR reports are wrapped); underscores (its "___"
  anonymisation) are stripped.
- `r2gen_iu_xray`: line breaks are kept inside a sentence (IU X-Ray reports are one line).

Written here from the description of those cleaners, not copied. Deviations, all only on
degenerate text: empty sentences are dropped and runs of whitespace collapsed (R2Gen keeps
"a .  . b ."), and an empty report cleans to "." (R2Gen: " ."), so an empty hypothesis scores
as the one-token report "." instead of failing. Both are idempotent.
"""
from __future__ import annotations

import re
from typing import Callable

# Stripped inside a sentence: R2Gen's character class `[.,?;*!%^&_+():-\[\]{}]`, whose `:-\[`
# is a range (so ; < = > ? @ go too), and the quotes and slashes it removes before it.
_STRIPPED = re.compile(r"""[.,?;*!%^&_+()\[\]{}:<=>@"'/\\-]""")
_RUNS_OF_DOTS = re.compile(r"\.{2,}")
_FIRST_ITEM = re.compile(r"(?<!\d)1\. ")  # "1. " starts a numbered list: dropped
_LATER_ITEM = re.compile(r"\.? [2-5]\. ")  # " 2. " .. " 5. ": the item ends a sentence


def _clean(text: str, newlines_are_spaces: bool) -> str:
    if newlines_are_spaces:
        text = text.replace("\n", " ")
    text = _RUNS_OF_DOTS.sub(".", re.sub(r"[ \t]+", " ", text))
    text = _LATER_ITEM.sub(". ", _FIRST_ITEM.sub("", text))
    sentences = []
    for sentence in text.strip().lower().split(". "):
        words = _STRIPPED.sub("", sentence).split()
        if words:
            sentences.append(" ".join(words) + " .")
    return " ".join(sentences) or "."


def clean_report_mimic_cxr(text: str) -> str:
    """"Heart enlarged.\\nNo effusion." -> "heart enlarged . no effusion ."."""
    return _clean(text, newlines_are_spaces=True)


def clean_report_iu_xray(text: str) -> str:
    """"1. Heart enlarged. 2. No effusion." -> "heart enlarged . no effusion ."."""
    return _clean(text, newlines_are_spaces=False)


CLEANERS: dict[str, Callable[[str], str]] = {
    "r2gen_mimic_cxr": clean_report_mimic_cxr, "r2gen_iu_xray": clean_report_iu_xray}
DEFAULT_CLEANING = "r2gen_mimic_cxr"


def cleaner(name: str) -> Callable[[str], str]:
    """The cleaning function called `name` (one of CLEANERS)."""
    if name not in CLEANERS:
        raise ValueError(f"unknown report cleaning {name!r}; expected one of {sorted(CLEANERS)}")
    return CLEANERS[name]
