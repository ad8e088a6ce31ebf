"""Clinical efficacy (CE) as report-generation papers report it: CheXpert-14 precision, recall
and F1 of the generated reports' labels against the references' labels.

Both sides are read by `pipeline.data.chexpert.label_chexpert` (rules, not CheXbert: the
numbers are close in kind to the papers', not equal). Uncertain (-1) counts as positive
(`UNCERTAIN_AS`, logged as the param `ce_uncertain`); negative and not mentioned are negative.
Micro scores pool tp/fp/fn over the 14 observations. Macro scores average the observations
that appear on at least one side; one on neither side has no defined F1 and is left out
(`chexpert_n_scored` says how many are in), where sklearn's zero_division=0 would count it as 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from pipeline.data.chexpert import OBSERVATIONS, POSITIVE, binary, label_chexpert
from pipeline.data.finding_metrics import counts_f1, macro, micro_counts, per_label_f1

UNCERTAIN_AS = POSITIVE
PARAMS = {"ce_labeler": "chexpert14-rules", "ce_uncertain": "positive"}


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
    return out
