"""The retrieval baseline: for each study, the training report whose findings are nearest to
the finding head's prediction.

The field's honest floor beside the constant report: a classify-then-generate model whose
writer cannot beat printing the closest training report has no reason to generate. "Nearest"
ranks as the candidate choice does (`pipeline.data.finding_metrics.disagreement`): the fewest
coarse groups that differ, then the fewest fine labels (side, zone, device kind); ties go to
the shortest report, then the earliest.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from pipeline.data.labeler import COARSE_FINDINGS, FINDINGS, coarse_labels, label_report, to_coarse


def _key(coarse: Mapping[str, int], fine: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
    return (tuple(int(coarse.get(g, 0)) for g in COARSE_FINDINGS),
            tuple(int(fine.get(n, 0)) for n in FINDINGS))


def _distance(a: tuple, b: tuple) -> tuple[int, int]:
    return tuple(sum(x != y for x, y in zip(u, v)) for u, v in zip(a, b))


def retrieve_reports(train_reports: Sequence[str],
                     predicted: Sequence[Mapping[str, int]]) -> list[str]:
    """For each predicted fine-label dict, the nearest training report (see module doc)."""
    if not train_reports:
        raise ValueError("the retrieval baseline needs training reports")
    shortest: dict[tuple, tuple[int, int, str]] = {}
    for order, report in enumerate(train_reports):
        key = _key(coarse_labels(report), label_report(report))
        if key not in shortest or len(report) < shortest[key][0]:
            shortest[key] = (len(report), order, report)
    pool = list(shortest.items())
    out = []
    for labels in predicted:
        wanted = _key(to_coarse(dict(labels)), labels)
        out.append(min(pool, key=lambda kv: (*_distance(kv[0], wanted), *kv[1][:2]))[1][2])
    return out
