"""Finding metrics: per-label precision/recall/F1 over label dicts, macro and micro averages.

One place for how findings are scored, whoever scores them: the finding head's validation
F1, `evaluate`'s scores, the blind baseline and the choice among candidate reports. Label
dicts map a finding name to 0/1, as the labeler (`pipeline.data.labeler`) reads them.
"""
from __future__ import annotations

import math
from typing import Sequence

from pipeline.data.labeler import (COARSE_FINDINGS, FINDINGS, coarse_labels, label_report,
                                   to_coarse)


def counts_f1(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 from counts; NaN when the label appears on neither side."""
    if tp + fp + fn == 0:
        return dict.fromkeys(("precision", "recall", "f1"), math.nan)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn)}


def per_label_f1(references: Sequence[dict], predictions: Sequence[dict],
                 names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{name: {precision, recall, f1}} over paired label dicts."""
    out = {}
    for name in names:
        pairs = [(bool(r[name]), bool(h[name])) for r, h in zip(references, predictions)]
        out[name] = counts_f1(sum(r and h for r, h in pairs), sum(h and not r for r, h in pairs),
                              sum(r and not h for r, h in pairs))
    return out


def macro_f1(table: dict[str, dict[str, float]]) -> float:
    """Mean F1 over the labels that have one (NaN when none has)."""
    return macro(table, "f1")


def macro(table: dict[str, dict[str, float]], key: str) -> float:
    """Mean of `key` (precision, recall or f1) over the labels that have one (NaN when none)."""
    values = [v[key] for v in table.values() if not math.isnan(v[key])]
    return sum(values) / len(values) if values else math.nan


def micro_counts(references: Sequence[dict], predictions: Sequence[dict],
                 names: Sequence[str]) -> tuple[int, int, int]:
    """(tp, fp, fn) pooled over every label of every pair."""
    pairs = [(bool(r[n]), bool(h[n])) for r, h in zip(references, predictions) for n in names]
    return (sum(r and h for r, h in pairs), sum(h and not r for r, h in pairs),
            sum(r and not h for r, h in pairs))


def label_scores(references: Sequence[dict], predictions: Sequence[dict], names: Sequence[str],
                 prefix: str) -> dict[str, float]:
    """Per-label precision/recall/F1, macro averages and pooled micro scores, under `prefix`."""
    table = per_label_f1(references, predictions, names)
    out: dict[str, float] = {}
    for name, values in table.items():
        out.update({f"{prefix}_{key}/{name}": value for key, value in values.items()})
    for key in ("precision", "recall", "f1"):
        out[f"{prefix}_macro_{key}"] = macro(table, key)
    micro = counts_f1(*micro_counts(references, predictions, names))
    out.update({f"{prefix}_micro_{key}": (0.0 if math.isnan(v) else v) for key, v in micro.items()})
    out[f"{prefix}_n_scored"] = float(sum(not math.isnan(v["f1"]) for v in table.values()))
    return out


def label_f1(reports: Sequence[str], predicted: Sequence[dict[str, int]],
             prefix: str = "") -> dict[str, float]:
    """Coarse and fine macro F1 of predicted fine labels against the reports' own labels."""
    references = [label_report(r) for r in reports]
    coarse_ref = [coarse_labels(r) for r in reports]
    coarse_hyp = [to_coarse(p) for p in predicted]
    return {f"{prefix}finding_coarse_macro_f1": macro_f1(
                per_label_f1(coarse_ref, coarse_hyp, COARSE_FINDINGS)),
            f"{prefix}finding_macro_f1": macro_f1(per_label_f1(references, predicted, FINDINGS))}


def disagreement(report: str, labels: dict[str, int]) -> tuple[int, int]:
    """How far a report's findings, as the labeler reads them, are from `labels`: (coarse
    groups that differ, fine labels that differ)."""
    coarse, fine, wanted = coarse_labels(report), label_report(report), to_coarse(labels)
    return (sum(coarse[k] != wanted[k] for k in COARSE_FINDINGS),
            sum(fine[k] != int(labels.get(k, 0)) for k in FINDINGS))
