"""evaluate: generate reports for a split and score them.

Reads: a Stage 2 model (a run id, `runs:/`, `models:/report-vlm@alias` or a checkpoint path).
Writes: metrics (`greedy_*`, `beam_*`, `score`, `grounding_gap`, `blind_*`), `reports.json`
(a table of id / reference / generated), `plots/finding_f1.png`, `eval_scores.json`,
`champion_verdict.json`; moves `report-vlm@champion` to the evaluated version when the
champion gate approves it (reads the image, beats the blind baseline and the champion), else
tags the run `champion.verdict=rejected` with `champion.reasons`.
"""
from __future__ import annotations

import math

import click

from pipeline.config import ChampionConfig
from pipeline.evaluate.evaluation import evaluate_model
from pipeline.gate.champion import ChampionEvidence, comparison_key, judge_champion
from pipeline.tracking.registry import (champion_state, record_champion_verdict,
                                        resolve_stage2_checkpoint)
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
        log_new_params({"model": model_ref, "data": data, "split": split, "profile": profile,
                        "num_beams": num_beams, "source_run": source_run or "",
                        **device_params(resolved)})
        outcome = evaluate_model(checkpoint, data=data, image_dir=image_dir, split=split,
                                 num_beams=auto(num_beams, int),
                                 max_new_tokens=auto(max_new_tokens, int), limit=auto(limit, int),
                                 out_dir=f"outputs/evaluate/{run.info.run_id}",
                                 meteor=meteor, device=resolved)
        # Findings absent from references and reports alike have no F1 (NaN): not logged.
        log_metrics({k: v for k, v in outcome.metrics.items() if math.isfinite(v)})
        log_param("score_definition", outcome.score_definition)
        log_new_params(outcome.params)  # text cleaning, CE labeler and its uncertain mapping
        log_table(outcome.table, "reports.json")
        log_dict(outcome.metrics, "eval_scores.json")
        log_files([outcome.figure], "plots")
        set_run_tags({"eval.model": model_ref, "eval.source_run": source_run or ""})
        if split == "test" and auto(limit, int) is None:
            message = _champion(outcome, source_run)
        else:
            message = "champion unchanged: only a full test-split evaluation can promote"
        verdict = "champion" if message.startswith("champion ->") else \
            "rejected" if "rejected" in message else "not judged"
        name_run(f"evaluate {verdict} {split}")
        click.echo(message, err=True)
        shown = {k: round(v, 4) for k, v in outcome.metrics.items()
                 if k.split("_", 1)[-1] in ("bleu4", "cider", "finding_macro_f1",
                                            "finding_coarse_macro_f1", "distinct_share")
                 or k in ("score", "grounding_gap")}
        click.echo(f"evaluate {split}: {shown}")


def _champion(outcome, source_run) -> str:
    """Judge the evaluated model for champion and record the verdict (run and version tags)."""
    m = outcome.metrics
    key = comparison_key(outcome.data_digest, int(m[f"{outcome.decoding}_n_reports"]),
                         outcome.decoding)
    version, champion_score, champion_key = champion_state()
    evidence = ChampionEvidence(
        m[f"{outcome.decoding}_finding_coarse_macro_f1"], m["blind_finding_coarse_macro_f1"],
        m["grounding_gap"], m["score"], key, version, champion_score, champion_key)
    verdict = judge_champion(evidence, ChampionConfig())
    log_dict(verdict.to_dict(), "champion_verdict.json")
    set_run_tags({"champion.verdict": "approved" if verdict.approved else "rejected",
                  "champion.reasons": "; ".join(verdict.reasons)[:4000]})
    log_metrics({f"champion.{r.name}.passed": float(r.passed) for r in verdict.rules})
    summary = {"eval.coarse_f1": f"{evidence.coarse_f1:.3f}",
               "eval.blind_coarse_f1": f"{evidence.blind_coarse_f1:.3f}",
               "eval.grounding_gap": f"{evidence.grounding_gap:.3f}"}
    table = outcome.table
    sample = str(table.iloc[0][f"generated_{outcome.decoding}"]) if len(table) else ""
    return record_champion_verdict(source_run, verdict, m["score"], outcome.score_definition,
                                   key, summary, _description(outcome, verdict), sample)


def _description(outcome, verdict) -> str:
    """What decides whether to trust this version, for its page in the MLflow UI."""
    m, d = outcome.metrics, outcome.decoding
    lines = [f"**champion gate: {'approved' if verdict.approved else 'rejected'}**"
             + (f" ({'; '.join(verdict.reasons)})" if verdict.reasons else ""), "",
             "| | model | blind baseline |", "|---|---|---|"]
    for label, key in (("coarse finding F1", "finding_coarse_macro_f1"),
                       ("fine finding F1 (18)", "finding_macro_f1"), ("BLEU-4", "bleu4"),
                       ("CIDEr", "cider")):
        lines.append(f"| {label} | {m[f'{d}_{key}']:.3f} | {m[f'blind_{key}']:.3f} |")
    lines += [f"| grounding gap (nats) | {m['grounding_gap']:.3f} | 0 |",
              f"| distinct reports | {m[f'{d}_distinct_share']:.2f} | "
              f"{1 / max(1, len(outcome.table)):.2f} |", "", f"Samples ({d}):"]
    for _, row in outcome.table.head(3).iterrows():
        lines += [f"- generated: {row[f'generated_{d}']}", f"  reference: {row['reference']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
