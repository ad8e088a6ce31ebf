"""evaluate: generate reports for a split and score them.

Reads: a Stage 2 model (a run id, `runs:/`, `models:/report-vlm@alias` or a checkpoint path).
Writes: metrics (`greedy_*`, `beam_*`, `score`, `grounding_gap`, `blind_*`, `retrieval_*`),
`reports.json` (a table of id / reference / generated / retrieval), `plots/finding_f1.png`, `eval_scores.json`,
`champion_verdict.json`; moves `report-vlm@champion` to the version that holds the evaluated
file when the champion gate approves it (`pipeline.gate.champion.decide_champion`), else tags
the run `champion.verdict=rejected` with `champion.reasons`.
"""
from __future__ import annotations

import math

import click

from pipeline.evaluate.evaluation import evaluate_model
from pipeline.gate.champion import (Evaluation, champion_metrics, comparison_key,
                                    decide_champion, not_judged)
from pipeline.tracking.registry import resolve_stage2_checkpoint
from pipeline.tracking.runs import (log_dict, log_files, log_metrics, log_new_params, log_param,
                                    log_table, name_run, set_run_tags, stage_run)
from pipeline.device import device_params, resolve_device
from steps.common import auto, device_option, one_line_errors, profile_option


@click.command()
@click.option("--model", "model_ref", default="models:/report-vlm@candidate", show_default=True,
              help="run id, runs:/..., models:/... or a checkpoint path")
@click.option("--data", default="synthetic", show_default=True)
@click.option("--image_dir", "--image-dir", default=None)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test",
              show_default=True)
@click.option("--num_beams", "--num-beams", default="auto", show_default=True,
              help="beam width for the beam-search pass (1 = greedy only); auto = the "
                   "model's eval_num_beams (3; demo and tiny: 1)")
@click.option("--max_new_tokens", "--max-new-tokens", default="auto")
@click.option("--limit", default="auto", help="evaluate the first N studies only")
@click.option("--meteor/--no-meteor", default=True, show_default=True,
              help="METEOR needs Java and ~15 s to start")
@profile_option  # accepted for symmetry with main; the model's own config sets all sizes
@device_option
@one_line_errors
def main(model_ref, data, image_dir, split, num_beams, max_new_tokens, limit, meteor, profile,
         device):
    """Generate and score reports; promote the champion."""
    checkpoint, source_run = resolve_stage2_checkpoint(model_ref)
    resolved = resolve_device(device)
    with stage_run("evaluate") as run:
        log_new_params({"model": model_ref, "split": split, "profile": profile,
                        "num_beams": num_beams, "source_run": source_run or "",
                        **device_params(resolved)})
        outcome = evaluate_model(checkpoint, data=data, image_dir=image_dir, split=split,
                                 num_beams=auto(num_beams, int),
                                 max_new_tokens=auto(max_new_tokens, int), limit=auto(limit, int),
                                 out_dir=f"outputs/evaluate/{run.info.run_id}",
                                 meteor=meteor, device=resolved)
        log_new_params({"data": outcome.data_source})  # `synthetic`: the model's own data
        # Findings absent from references and reports alike have no F1 (NaN): not logged.
        log_metrics({k: v for k, v in outcome.metrics.items() if math.isfinite(v)})
        log_param("score_definition", outcome.score_definition)
        log_new_params(outcome.params)  # text cleaning, CE labeler and its uncertain mapping
        log_table(outcome.table, "reports.json")
        log_dict(outcome.metrics, "eval_scores.json")
        log_files([outcome.figure], "plots")
        set_run_tags({"eval.model": model_ref, "eval.source_run": source_run or ""})
        if split == "test" and auto(limit, int) is None:
            decision = _champion(outcome, checkpoint, source_run)
        else:
            decision = not_judged("only a full test-split evaluation can promote")
        name_run(f"evaluate {decision.label} {split}")
        click.echo(decision.message, err=True)
        shown = {k: round(v, 4) for k, v in outcome.metrics.items()
                 if k.split("_", 1)[-1] in ("bleu4", "cider", "finding_macro_f1",
                                            "finding_coarse_macro_f1", "distinct_share")
                 or k in ("score", "grounding_gap")}
        click.echo(f"evaluate {split}: {shown}")
        wins = _retrieval_wins(outcome.metrics, outcome.decoding)
        if wins:
            click.echo(f"the retrieval baseline wins: {wins}")


def _retrieval_wins(m, d: str) -> str:
    """Where the retrieval baseline scores at least the model ("" where it nowhere does)."""
    keys = (("coarse finding F1", "finding_coarse_macro_f1"),
            ("CheXpert-14 micro F1", "chexpert_micro_f1"), ("BLEU-4", "bleu4"))
    return "; ".join(f"{label} {m[f'retrieval_{key}']:.3f} (model {m[f'{d}_{key}']:.3f})"
                     for label, key in keys if f"retrieval_{key}" in m
                     and m[f"retrieval_{key}"] >= m[f"{d}_{key}"])


def _champion(outcome, checkpoint, source_run):
    """Judge the evaluated file for champion; record the verdict on the run (the version's
    tags and the alias are `decide_champion`'s)."""
    m, d = outcome.metrics, outcome.decoding
    key = comparison_key(outcome.data_digest, int(m[f"{d}_n_reports"]), d, outcome.num_beams,
                         outcome.n_candidates)
    table = outcome.table
    decision = decide_champion(Evaluation(
        champion_metrics(m, d), key, checkpoint, source_run, outcome.score_definition,
        _description(outcome), str(table.iloc[0][f"generated_{d}"]) if len(table) else ""))
    verdict = decision.verdict
    log_dict(verdict.to_dict(), "champion_verdict.json")
    set_run_tags({"champion.verdict": "approved" if verdict.approved else "rejected",
                  "champion.reasons": "; ".join(verdict.reasons)[:4000]})
    log_metrics({f"champion.{r.name}.passed": float(r.passed) for r in verdict.rules})
    return decision


def _description(outcome) -> str:
    """What decides whether to trust this version, for its page in the MLflow UI."""
    m, d = outcome.metrics, outcome.decoding
    lines = ["| | model | blind baseline | retrieval baseline |", "|---|---|---|---|"]
    for label, key in (("coarse finding F1", "finding_coarse_macro_f1"),
                       ("fine finding F1 (18)", "finding_macro_f1"),
                       ("CheXpert-14 micro F1", "chexpert_micro_f1"),
                       ("CheXpert-14 macro F1", "chexpert_macro_f1"), ("BLEU-4", "bleu4"),
                       ("CIDEr", "cider"), ("ROUGE-L", "rouge_l"),
                       ("report form (references: "
                        f"{m.get('reference_report_form', float('nan')):.2f})", "report_form"),
                       ("self-contradicting reports (as served)", "contradiction_share")):
        lines.append(f"| {label} | " + " | ".join(
            f"{m.get(k, math.nan):.3f}" for k in (f"{d}_{key}", f"blind_{key}",
                                                  f"retrieval_{key}")) + " |")
    lines.append(f"| chat preambles | {m.get(f'{d}_preamble_share', math.nan):.3f} | 0 | 0 |")
    lines += [f"| grounding gap (nats) | {m['grounding_gap']:.3f} | 0 | |",
              f"| distinct reports | {m[f'{d}_distinct_share']:.2f} | "
              f"{1 / max(1, len(outcome.table)):.2f} | |", "",
              "As written, before any repair, against the findings in the prompt:", ""]
    lines += [f"- {label}: {m.get(f'{d}_{key}', math.nan):.3f}" for label, key in _FAITHFULNESS]
    lines += ["", f"Samples ({d}):"]
    for _, row in outcome.table.head(3).iterrows():
        lines += [f"- generated: {row[f'generated_{d}']}", f"  reference: {row['reference']}"]
    return "\n".join(lines)


_FAITHFULNESS = (("prompt recall (prompt findings the report states)", "prompt_recall"),
                 ("prompt precision (stated findings the prompt named)", "prompt_precision"),
                 ("self-contradicting reports", "contradiction_share_as_written"),
                 ("reports the repair edited", "repaired_share"),
                 ("reports with a size no training reference gives", "invented_size_share"),
                 ("coarse finding F1 over the head's", "report_over_head_coarse_f1"))


if __name__ == "__main__":
    main()
