"""Clinical efficacy (CE) as report-generation papers report it: CheXpert-14 precision, recall
and F1 of the generated reports' labels against the references' labels.

Both sides are read by `pipeline.data.chexpert.label_chexpert` (rules, not CheXbert: the
numbers are close in kind to the papers', not equal). Uncertain (-1) counts as positive
(`UNCERTAIN_AS`, logged as the param `ce_uncertain`); negative and not mentioned are negative.
Micro scores pool tp/fp/fn over the 14 observations. Macro scores average the observations
that appear on at least one side; one on neither side has no defined F1 and is left out
(`chexpert_n_scored` says how many are in), where sklearn's zero_division=0 would count it as 0.

The same labels in the conventions papers publish (`paper_scores`), each named with its
labeler, `rule` (these are not CheXbert's numbers; docs/results.md says which published
figures they line up with):
- `ce_rule_micro14_*`: tp/fp/fn pooled over the 14 (the same numbers as `chexpert_micro_*`);
- `ce_rule_macro14_*`: the mean over all 14, an observation on neither side counting 0, as
  sklearn's `average="macro"` gives it (papers' scripts);
- `ce_rule_micro5_*`: pooled over Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural
  Effusion;
- `ce_rule_example14_*`: example-based, as the R2Gen family's CE scripts compute it: per
  report, precision = shared positives / the generated report's positives, recall = shared /
  the reference's (0 when the denominator is 0), F1 their harmonic mean (0 when both are 0),
  each averaged over the reports.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from pipeline.data.chexpert import OBSERVATIONS, POSITIVE, binary, label_chexpert
from pipeline.data.finding_metrics import counts_f1, macro, micro_counts, per_label_f1

UNCERTAIN_AS = POSITIVE
PARAMS = {"ce_labeler": "chexpert14-rules", "ce_uncertain": "positive"}
LABELER = "rule"  # the labeler's name in the paper-convention metric names
FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _key(name: str) -> str:
    return name.lower().replace(" ", "_")


def chexpert_labels(reports: Sequence[str]) -> list[dict[str, int]]:
    """0/1 CheXpert-14 labels of each report, uncertain as positive."""
    return [binary(label_chexpert(r), uncertain=UNCERTAIN_AS) for r in reports]


def chexpert_scores(references: Sequence[Mapping[str, int]],
                    hypotheses: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """`chexpert_{micro,macro}_{precision,recall,f1}`, per-observation `chexpert_f1/<name>`
    and `chexpert_n_scored`, from paired 0/1 labels (`chexpert_labels`)."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references, at least one: got "
                         f"{len(references)} and {len(hypotheses)}")
    table = per_label_f1(references, hypotheses, OBSERVATIONS)
    out = {f"chexpert_f1/{_key(name)}": values["f1"] for name, values in table.items()}
    for key in ("precision", "recall", "f1"):
        out[f"chexpert_macro_{key}"] = macro(table, key)
    micro = counts_f1(*micro_counts(references, hypotheses, OBSERVATIONS))
    out.update({f"chexpert_micro_{k}": (0.0 if math.isnan(v) else v) for k, v in micro.items()})
    out["chexpert_n_scored"] = float(sum(not math.isnan(v["f1"]) for v in table.values()))
    out.update(paper_scores(references, hypotheses))
    return out


def paper_scores(references: Sequence[Mapping[str, int]],
                 hypotheses: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """`ce_rule_{micro14,macro14,micro5,example14}_{precision,recall,f1}` (module docstring)."""
    prefix = f"ce_{LABELER}"
    out: dict[str, float] = {}
    for name, labels in (("micro14", OBSERVATIONS), ("micro5", FIVE)):
        micro = counts_f1(*micro_counts(references, hypotheses, labels))
        out.update({f"{prefix}_{name}_{k}": (0.0 if math.isnan(v) else v)
                    for k, v in micro.items()})
    table = per_label_f1(references, hypotheses, OBSERVATIONS)
    for key in ("precision", "recall", "f1"):
        values = [0.0 if math.isnan(v[key]) else v[key] for v in table.values()]
        out[f"{prefix}_macro14_{key}"] = sum(values) / len(values)
    per_report = [_example(r, h) for r, h in zip(references, hypotheses)]
    for i, key in enumerate(("precision", "recall", "f1")):
        out[f"{prefix}_example14_{key}"] = sum(e[i] for e in per_report) / len(per_report)
    return out


def _example(reference: Mapping[str, int], hypothesis: Mapping[str, int]
             ) -> tuple[float, float, float]:
    """One report's example-based precision, recall and F1 over the 14."""
    shared = sum(bool(reference[n]) and bool(hypothesis[n]) for n in OBSERVATIONS)
    predicted = sum(bool(hypothesis[n]) for n in OBSERVATIONS)
    actual = sum(bool(reference[n]) for n in OBSERVATIONS)
    precision = shared / predicted if predicted else 0.0
    recall = shared / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1
