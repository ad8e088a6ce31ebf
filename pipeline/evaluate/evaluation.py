"""Evaluation: generate reports for a split (greedy and beam search) and score them.

Beside the scores: the grounding gap (caption loss with the images shifted by one study minus
with their own, through the inference path) and a blind baseline, the same scores for the best
constant report, the training report whose coarse finding F1 over the training reports is
highest, written for every study of the split. A model that does not beat it has learned
nothing about the images. Clinical efficacy: CheXpert-14 precision, recall and F1 (micro and
macro, uncertain counted as positive; `pipeline.evaluate.clinical`) of each decoding and of the
blind baseline (`chexpert_*`, `blind_chexpert_*`), and the same labels in the conventions papers
publish, named with the labeler (`ce_rule_{micro14,macro14,micro5,example14}_*`,
`blind_ce_rule_*`). Text metrics are computed on reports cleaned as the R2Gen family cleans
them (`text_cleaning` in `EvalOutcome.params`).

For a classify-then-generate model, a second baseline: retrieval (`retrieval_*`, scored like the
blind one), the training report whose findings are nearest to the head's prediction
(`pipeline.evaluate.retrieval`); and the faithfulness of each decoding's reports to their
prompt, counted on the text as written, before the contradiction repair
(`pipeline.evaluate.faithfulness`: `{decoding}_prompt_recall`, `_prompt_precision`,
`_contradiction_share_as_written`, `_invented_size_share`, beside `_repaired_share`, the share
of reports the repair changed).

Every pass over the split runs in batches that decode their films when they come, so memory
does not grow with the split.

With beams and a finding head, the report written is the candidate (the beams and
`choose_samples` sampled reports) whose findings agree best with those its prompt was given
(`choose_by_findings`); the top beam's scores are logged beside it (`beam_top_*`) when the two
differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from pipeline.data import DataError, ImageReportDataset, collate, dataset_digest, load_dataset
from pipeline.data.finding_metrics import label_f1
from pipeline.device import resolve_device
from pipeline.evaluate.clinical import PARAMS as CE_PARAMS, chexpert_labels, chexpert_scores
from pipeline.evaluate.faithfulness import faithfulness_scores, sized_groups
from pipeline.evaluate.retrieval import retrieve_reports
from pipeline.data.report_cleaning import DEFAULT_CLEANING
from pipeline.data.synthetic import SOURCES as SYNTHETIC_SOURCES
from pipeline.models.findings import findings_text
from pipeline.models.loading import load_report_model
from pipeline.models.report_model import choose_reports, repair_reports, uses_findings
from pipeline.train.split_pass import split_findings, split_grounding_losses


@dataclass
class EvalOutcome:
    """Metrics, the id/reference/generated table and the per-finding F1 figure."""

    metrics: dict
    table: pd.DataFrame
    figure: Path
    score_definition: str
    decoding: str = "greedy"
    blind_report: str = ""
    data_digest: str = ""
    num_beams: int = 1  # of the last decoding
    n_candidates: int = 1  # reports it chose among per study (beams and samples)
    params: dict = field(default_factory=dict)  # how the scores were computed, for the run
    data_source: str = ""  # the data evaluated: `synthetic` means the model's own training data


@dataclass(frozen=True)
class Generated:
    """One decoding of a split."""

    written: list[str]  # what the model serves: the chosen reports, repaired when configured
    as_written: list[str]  # the chosen reports before any repair
    top_beam: list[str]  # the first candidate of each study
    given: list[dict] | None  # the findings each prompt named (None: no finding head)
    n_candidates: int  # reports chosen among per study

    @property
    def repaired_share(self) -> float:
        """The share of reports the contradiction repair changed."""
        return sum(w != a for w, a in zip(self.written, self.as_written)) / max(1, len(self.written))


def _generate_all(report_model, records, num_beams: int, max_new_tokens,
                  batch_size: int = 16) -> Generated:
    """Every record's reports, chosen among the candidates and repaired as the model serves
    them, and as written before the repair."""
    dataset = ImageReportDataset(records, report_model.cfg.encoder.image_size)
    candidates, given = [], []
    label = "greedy" if num_beams == 1 else f"beam{num_beams}"
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"generate ({label})", unit="batch"):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        options, labels = report_model.candidates(batch["images"], num_beams=num_beams,
                                                  max_new_tokens=max_new_tokens)
        candidates += options
        given = None if labels is None else given + labels
    chosen = choose_reports(candidates, given, report_model.cfg.choose_by_findings,
                            report_model.style)
    written = repair_reports(chosen, given) if report_model.cfg.resolve_contradictions else chosen
    return Generated(written, chosen, [options[0] for options in candidates], given,
                     max(map(len, candidates), default=1))


def evaluate_model(checkpoint, data: str = "synthetic", image_dir=None, split: str = "test",
                   num_beams: int | None = None, max_new_tokens=None, limit=None, out_dir="outputs/evaluate",
                   report_model=None, meteor: bool = True, device: str = "auto") -> EvalOutcome:
    """Score greedy (and, if num_beams > 1, beam) reports of a Stage 2 checkpoint on a split
    (on `device`: auto = CUDA when available)."""
    from pipeline.evaluate.scoring import (DEFAULT_SCORE_WEIGHTS, composite_score, per_finding_f1_figure,
                                  score_reports)

    from pipeline.data.report_text import ReportStyle, language_scores

    report_model = report_model or load_report_model(checkpoint, device=resolve_device(device))
    num_beams = num_beams or report_model.cfg.eval_num_beams
    # `synthetic` (the default): the data the model was trained on; another synthetic version
    # at the model's sizes; else a file.
    data_cfg = report_model.cfg.data if data == "synthetic" else \
        replace(report_model.cfg.data, source=data) if data in SYNTHETIC_SOURCES else \
        replace(report_model.cfg.data, source=data, image_dir=image_dir)
    dataset = load_dataset(data_cfg)
    # Report form is judged against the training reports of the data evaluated on; candidate
    # choice uses the style saved with the model (its own training reports) when it has one.
    style = ReportStyle.from_reports(r.report for r in dataset["train"])
    if report_model.style is None:
        report_model = replace(report_model, style=style)
    records = dataset[split][:limit]
    if not records:
        raise DataError(f"split {split!r} of {data_cfg.source!r} is empty")
    references = [r.report for r in records]
    table = pd.DataFrame({"id": [r.id for r in records], "reference": references})
    metrics: dict[str, float] = {}
    reference_labels = chexpert_labels(references)
    decodings = [("greedy", 1)] + ([("beam", num_beams)] if num_beams > 1 else [])
    best = None
    sized = sized_groups(r.report for r in dataset["train"])
    for name, beams in decodings:
        run = _generate_all(report_model, records, beams, max_new_tokens)
        generated, top_beam, n_candidates = run.written, run.top_beam, run.n_candidates
        table[f"generated_{name}"] = generated
        if run.as_written != generated:
            table[f"as_written_{name}"] = run.as_written
        if run.given is not None:  # what the prompt told the writer: the head's findings
            table["prompt_findings"] = [findings_text(labels) for labels in run.given]
        scores = {**score_reports(references, generated, meteor=meteor),
                  **language_scores(generated, style)}
        metrics.update({f"{name}_{k}": float(v) for k, v in scores.items()})
        metrics.update({f"{name}_{k}": v for k, v in
                        chexpert_scores(reference_labels, chexpert_labels(generated)).items()})
        if top_beam != generated:  # the first candidate as written, beside the one scored
            top = {**score_reports(references, top_beam, meteor=False),
                   **language_scores(top_beam, style)}
            metrics.update({f"{name}_top_{k}": float(top[k]) for k in TOP_BEAM_KEYS})
        metrics[f"{name}_repaired_share"] = run.repaired_share  # reports the repair changed
        metrics.update({f"{name}_{k}": v for k, v in
                        faithfulness_scores(run.as_written, run.given, sized).items()})
        best = scores  # the last decoding (beam when run) picks the champion
    weights = DEFAULT_SCORE_WEIGHTS
    definition = " + ".join(f"{w:g}*{k}" for k, w in weights.items()) + \
        f" ({decodings[-1][0]} decoding)"
    metrics["score"] = composite_score(best, weights)
    size = report_model.cfg.encoder.image_size
    own, shifted = split_grounding_losses(report_model.model, report_model.llm, records, size,
                                          report_model.cfg)
    metrics["caption_loss"], metrics["grounding_gap"] = own, shifted - own
    if uses_findings(report_model.cfg, report_model.model):
        retrieved, head = _head_and_retrieval(report_model, records, dataset["train"],
                                              reference_labels, style, metrics, decodings)
        table["retrieval"] = retrieved
        metrics.update(head)
    blind = best_constant_report([r.report for r in dataset["train"]])
    metrics.update(_baseline("blind", references, [blind] * len(references), reference_labels,
                             style))
    # How the references themselves read: the ceiling of report form on this data.
    metrics["reference_report_form"] = language_scores(references, style)["report_form"]
    for key in ("finding_coarse_macro_f1", "finding_macro_f1"):
        metrics[f"{key}_over_blind"] = best[key] - metrics[f"blind_{key}"]
    figure = per_finding_f1_figure(best, Path(out_dir) / "finding_f1.png")
    return EvalOutcome(metrics, table, figure, definition, decodings[-1][0], blind,
                       dataset_digest(dataset), decodings[-1][1], n_candidates,
                       {"text_cleaning": DEFAULT_CLEANING, **CE_PARAMS}, data_cfg.source)


TOP_BEAM_KEYS = ("finding_coarse_macro_f1", "finding_macro_f1", "bleu4", "cider", "report_form",
                 "contradiction_share")
BLIND_KEYS = ("finding_coarse_macro_f1", "finding_macro_f1", "bleu4", "cider", "rouge_l",
              "report_form", "contradiction_share")
BLIND_CE_KEYS = tuple(f"chexpert_{avg}_{k}" for avg in ("micro", "macro")
                      for k in ("precision", "recall", "f1")) + \
    tuple(f"ce_rule_{avg}_{k}" for avg in ("micro14", "macro14", "micro5", "example14")
          for k in ("precision", "recall", "f1"))


def _head_and_retrieval(report_model, records, train, reference_labels, style,
                        metrics: dict, decodings) -> tuple[list[str], dict[str, float]]:
    """The retrieval baseline's reports, and the scores of the head that chose them: the head
    alone (`head_*`), each decoding's coarse F1 over the head's, the retrieval baseline's
    (`retrieval_*`) and the last decoding's margins over it (`*_over_retrieval`)."""
    references = [r.report for r in records]
    # The classifier that writes the prompt, scored alone: the ceiling of classify-then-
    # generate; the report's share of it says how well the LLM writes the findings it is given.
    predicted = split_findings(report_model.model, records, report_model.cfg.encoder.image_size)
    out = label_f1(references, predicted, prefix="head_")
    head = out["head_finding_coarse_macro_f1"]
    last = decodings[-1][0]
    if head > 0:
        out["report_over_head_coarse_f1"] = metrics[f"{last}_finding_coarse_macro_f1"] / head
        out.update({f"{name}_report_over_head_coarse_f1":
                    metrics[f"{name}_finding_coarse_macro_f1"] / head for name, _ in decodings})
    retrieved = retrieve_reports([r.report for r in train], predicted)
    out.update(_baseline("retrieval", references, retrieved, reference_labels, style))
    for key in ("finding_coarse_macro_f1", "chexpert_micro_f1", "bleu4"):
        out[f"{key}_over_retrieval"] = metrics[f"{last}_{key}"] - out[f"retrieval_{key}"]
    return retrieved, out


def _baseline(prefix: str, references: Sequence[str], reports: Sequence[str],
              reference_labels: Sequence[dict], style) -> dict[str, float]:
    """A baseline's reports scored as the model's are: `{prefix}_` + BLIND_KEYS, BLIND_CE_KEYS
    and the composite score."""
    from pipeline.data.report_text import language_scores
    from pipeline.evaluate.scoring import DEFAULT_SCORE_WEIGHTS, composite_score, score_reports

    scores = {**score_reports(references, reports, meteor=False),
              **language_scores(reports, style)}
    ce = chexpert_scores(reference_labels, chexpert_labels(reports))
    return {**{f"{prefix}_{k}": float(scores[k]) for k in BLIND_KEYS},
            **{f"{prefix}_{k}": ce[k] for k in BLIND_CE_KEYS},
            f"{prefix}_score": composite_score(scores, DEFAULT_SCORE_WEIGHTS)}


def best_constant_report(train_reports: list[str]) -> str:
    """The training report that, written for every training study, scores the highest coarse
    finding macro F1 (ties: fine macro F1, then the shorter report)."""
    from pipeline.data.labeler import COARSE_FINDINGS, FINDINGS, coarse_labels, label_report
    from pipeline.data.finding_metrics import macro_f1, per_label_f1

    if not train_reports:
        raise ValueError("the blind baseline needs training reports")
    fine = [label_report(r) for r in train_reports]
    coarse = [coarse_labels(r) for r in train_reports]
    scored = {}
    for i, report in enumerate(train_reports):
        key = tuple(sorted(k for k, v in coarse[i].items() if v)), \
            tuple(sorted(k for k, v in fine[i].items() if v))
        if key in scored and len(scored[key][3]) <= len(report):  # same findings, same score
            continue
        scored[key] = (macro_f1(per_label_f1(coarse, [coarse[i]] * len(coarse), COARSE_FINDINGS)),
                       macro_f1(per_label_f1(fine, [fine[i]] * len(fine), FINDINGS)),
                       -len(report), report)
    return max(scored.values())[3]
