"""Does the writer say what the head saw? Faithfulness of reports to their prompt's findings.

Counted on the text as the LLM wrote it (the chosen candidate), before any repair
(`pipeline.data.report_text.resolve_contradictions`), so that a repair cannot hide what the
writer did:

- **prompt recall**: the share of the prompt's findings (the finding head's decoded labels:
  the group, and the side or zone where the prompt gives one) that the report states, as the
  labeler reads it; pooled over the split.
- **prompt precision**: the share of the findings the report states that its prompt named (a
  mention without a side or zone counts as named when the prompt names that group anywhere).
- **contradiction share as written**: reports that assert and deny the same finding group.
- **invented sizes**: reports that attach a size ("2.5 cm", "12 mm") to a finding group the
  training references never size. Which groups are sized is read from the training reports
  (`sized_groups`): on the synthetic benchmark only nodules are, so a sized pacemaker,
  effusion or heart is invented.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

from pipeline.data.labeler import (COARSE_FINDINGS, coarse_labels, covered, label_report,
                                   named_findings)
from pipeline.data.report_text import contradictions

_SIZE = re.compile(r"\b\d+(?:\.\d+)?\s*-?\s*(?:cm|mm|centimet(?:er|re)s?|millimet(?:er|re)s?)\b",
                   re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# A size belongs to the finding of its own clause: "cardiomegaly with a 3 cm effusion" sizes
# the effusion, not the heart.
_CLAUSE_BREAK = re.compile(r"[,;]|\b(?:and|with|without|but|while|whereas)\b", re.IGNORECASE)


def _sized_clauses(report: str) -> Iterable[set[str]]:
    """The finding groups each clause that carries a size asserts."""
    for sentence in _SENTENCE_BREAK.split(report.strip()):
        for clause in _CLAUSE_BREAK.split(sentence):
            if _SIZE.search(clause):
                yield {g for g, v in coarse_labels(clause).items() if v and g != "no_finding"}


def sized_groups(train_reports: Iterable[str]) -> frozenset[str]:
    """The finding groups the training references ever give a size to."""
    return frozenset(g for report in train_reports for groups in _sized_clauses(report)
                     for g in groups)


def invented_sizes(report: str, sized: frozenset[str]) -> list[str]:
    """Groups the report sizes that no training reference sizes (a clause naming a sized group
    as well is given the benefit of the doubt)."""
    invented: set[str] = set()
    for groups in _sized_clauses(report):
        if groups and not groups & sized:
            invented |= groups
    return [g for g in COARSE_FINDINGS if g in invented]


def prompt_counts(report: str, labels: Mapping[str, int]) -> tuple[int, int, int, int]:
    """(prompt findings the report states, prompt findings, stated findings the prompt named,
    stated findings) of one report and the labels its prompt was given."""
    named, stated = named_findings(labels), named_findings(label_report(report))
    return (sum(covered(n, stated) for n in named), len(named),
            sum(covered(s, named) for s in stated), len(stated))


def _share(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def faithfulness_scores(as_written: Sequence[str], given: Sequence[Mapping[str, int]] | None,
                        sized: frozenset[str]) -> dict[str, float]:
    """`contradiction_share_as_written`, `invented_size_share` (reports) and, when the prompts
    named findings (`given`, the head's labels), `prompt_recall` and `prompt_precision`
    (pooled; NaN when there was nothing to count)."""
    if not as_written:
        raise ValueError("faithfulness needs at least one report")
    n = len(as_written)
    out = {"contradiction_share_as_written": sum(bool(contradictions(r)) for r in as_written) / n,
           "invented_size_share": sum(bool(invented_sizes(r, sized)) for r in as_written) / n}
    if given is not None:
        counts = [prompt_counts(r, labels) for r, labels in zip(as_written, given)]
        totals = [sum(column) for column in zip(*counts)]
        out["prompt_recall"] = _share(totals[0], totals[1])
        out["prompt_precision"] = _share(totals[2], totals[3])
    return out
