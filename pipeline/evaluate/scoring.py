"""Report scoring: COCO caption metrics, finding-level F1 from the labeler, diversity, composite.

Text pre-processing. Both sides go through the R2Gen family's report cleaning
(`pipeline.data.report_cleaning`; `cleaning` names the variant, default `r2gen_mimic_cxr`)
instead of pycocoevalcap's PTBTokenizer: the tokens R2Gen scores, so BLEU and CIDEr compare
with the papers' tables, no Java start-up, and idempotent. An empty hypothesis is scored as the
one-token report "." (near-zero scores, no crash) rather than rejected.

NLG metrics are pycocoevalcap's Bleu(4), Meteor(), Rouge() and Cider() over `{i: [text]}`,
corpus-level as the COCO caption evaluation reports them. CIDEr's document frequencies come
from the references passed in, so it is only comparable across calls on the same reference set.
METEOR runs the bundled jar under Java; loading its paraphrase table takes 10-20 s on two
cores, so one METEOR process is started on first use and reused for the rest of the process.
Without Java (or if that process fails) METEOR is NaN and a warning is logged once.

Finding scores read both texts with `pipeline.data.labeler.label_report` (see there for the
negation rules). Per finding: precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn).
A finding that appears on neither side (tp+fp+fn = 0) has no defined score: its three values
are NaN and it is left out of the macro averages (`finding_n_scored` says how many are in).
A finding present on one side only has F1 0, and its undefined precision or recall counts as 0
(sklearn's zero_division=0). Micro scores pool tp/fp/fn over all findings, `no_finding` included.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from pipeline.data.report_cleaning import DEFAULT_CLEANING, cleaner
from pipeline.data.report_cleaning import clean_report_mimic_cxr as clean_report  # noqa: F401
from pipeline.train.curve import distinct_share  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

# R2GenGPT picks its checkpoint by 0.5 * BLEU-4 + 0.5 * CIDEr, which a fluent report that
# names no finding can win; here half the weight is clinical: the coarse finding macro F1.
DEFAULT_SCORE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"finding_coarse_macro_f1": 0.5, "bleu4": 0.25, "cider": 0.25})

def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references, at least one: got "
                         f"{len(references)} references and {len(hypotheses)} hypotheses")


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _meteor_scorer():
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    atexit.register(scorer.meteor_p.kill)
    return scorer


def _meteor(gts: dict, res: dict) -> float:
    if shutil.which("java") is None:
        _warn_once("java not found on PATH: METEOR is reported as NaN (install a JRE to score it)")
        return math.nan
    try:
        scorer = _meteor_scorer()
        return float(scorer.compute_score(gts, res)[0])
    except (OSError, ValueError) as err:  # java died or answered garbage: start afresh next time
        if _meteor_scorer.cache_info().currsize:
            scorer.meteor_p.kill()
            if scorer.lock.locked():  # compute_score raised holding it; Meteor.__del__ takes it
                scorer.lock.release()
            _meteor_scorer.cache_clear()
        _warn_once(f"METEOR failed ({err!r}): it is reported as NaN")
        return math.nan


def nlg_scores(references: Sequence[str], hypotheses: Sequence[str], *,
               meteor: bool = True, cleaning: str = DEFAULT_CLEANING) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr as pycocoevalcap computes them, on reports
    cleaned by `cleaning` (a name in `report_cleaning.CLEANERS`)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_pairs(references, hypotheses)
    clean = cleaner(cleaning)
    gts = {i: [clean(text)] for i, text in enumerate(references)}
    res = {i: [clean(text)] for i, text in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints
    scores = {f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["meteor"] = _meteor(gts, res) if meteor else math.nan
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def finding_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Finding scores of the fine labels (`finding_*`) and the coarse groups
    (`finding_coarse_*`: any side or zone, unlocalised mentions counted)."""
    from pipeline.data.finding_metrics import label_scores
    from pipeline.data.labeler import COARSE_FINDINGS, FINDINGS, coarse_labels, label_report

    _check_pairs(references, hypotheses)
    out = label_scores([label_report(r) for r in references],
                       [label_report(h) for h in hypotheses], FINDINGS, "finding")
    out.update(label_scores([coarse_labels(r) for r in references],
                            [coarse_labels(h) for h in hypotheses], COARSE_FINDINGS,
                            "finding_coarse"))
    return out


def score_reports(references: Sequence[str], hypotheses: Sequence[str], *,
                  meteor: bool = True) -> dict[str, float]:
    """All scores of generated reports against their references: NLG, findings, diversity, count."""
    _check_pairs(references, hypotheses)
    return {**nlg_scores(references, hypotheses, meteor=meteor),
            **finding_scores(references, hypotheses),
            "distinct_share": distinct_share(hypotheses), "n_reports": float(len(hypotheses))}


def composite_score(scores: Mapping[str, float],
                    weights: Mapping[str, float] = DEFAULT_SCORE_WEIGHTS) -> float:
    """Weighted sum of scores (DEFAULT_SCORE_WEIGHTS), the number picking the champion."""
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise KeyError(f"composite_score needs {missing}, absent from scores {sorted(scores)}")
    # A NaN would compare False against every champion and so never win or lose: refuse it.
    bad = {k: scores[k] for k in weights if not math.isfinite(scores[k])}
    if bad:
        raise ValueError(f"composite_score got non-finite scores {bad}")
    return float(sum(w * scores[k] for k, w in weights.items()))


def per_finding_f1_figure(scores: Mapping[str, float], path: str | Path) -> Path:
    """Bar chart PNG of per-finding F1 ("n/a": finding on neither side) with the macro F1 line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prefix = "finding_f1/"
    names = [k.removeprefix(prefix) for k in scores if k.startswith(prefix)]
    values = [scores[prefix + name] for name in names]
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)  # no pyplot: no global backend switch, no figure registry
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [v if math.isfinite(v) else 0.0 for v in values], color="tab:blue")
    for i, value in enumerate(values):
        if not math.isfinite(value):  # a zero-height bar would read as F1 = 0
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", rotation=90, color="grey",
                    fontsize=8)
    macro = scores.get("finding_macro_f1", math.nan)
    if math.isfinite(macro):
        ax.axhline(macro, color="tab:red", ls="--", lw=1, label=f"macro F1 {macro:.3f}")
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Per-finding F1, labeler on generated vs reference (n/a: on neither side)")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
