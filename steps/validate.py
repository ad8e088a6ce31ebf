"""validate: the gate between Stage 1 and Stage 2.

Reads: a Stage 1 run (its status, `final_train_loss`, `lr`, `objective`, `health_*` metrics,
`checkpoints/vision_bridge_final.safetensors` and its recorded sha256), or a bare checkpoint.
Writes: on approval a `vision-bridge` version with alias `stage2-ready`; on rejection the tags
`gate.verdict=rejected` / `gate.reasons` on the Stage 1 run and exit code 2. Either way this
run's params, `gate.*` metrics and `gate_report.json`.
"""
from __future__ import annotations

import sys

import click

from pipeline import config as C
from pipeline.checkpoint import sha256_file
from pipeline.gate.evidence import checkpoint_evidence, recorded_profile, run_evidence
from pipeline.gate.rules import evaluate_gate
from pipeline.tracking.registry import mark_approved, promote_vision_bridge, reject_stage1
from pipeline.tracking.runs import (latest_run, log_dict, log_metrics, log_new_params,
                                    name_run, set_run_tags, stage_run)
from steps.common import EXIT_REFUSED, auto, one_line_errors, profile_option


@click.command()
@click.option("--stage1_run", "--stage1-run", default="latest",
              help="run id; default: the latest finished Stage 1 run")
@click.option("--checkpoint", default="none", help="a bare checkpoint (.safetensors or .pt)")
@click.option("--min_final_loss", "--min-final-loss", default="1e-3", show_default=True)
@click.option("--max_lr", "--max-lr", default="1e-5", show_default=True)
@click.option("--data", default="synthetic", show_default=True, help="probe data (checkpoints)")
@profile_option  # a fallback: the profile the Stage 1 run or checkpoint recorded wins
@one_line_errors
def main(stage1_run, checkpoint, min_final_loss, max_lr, data, profile):
    """Promote a Stage 1 run's weights or refuse them with reasons."""
    checkpoint = auto(checkpoint, str)
    if checkpoint is None and auto(stage1_run, str) in (None, "latest"):
        run = latest_run("stage1")
        if run is None:
            raise C.ConfigError("no finished Stage 1 run found; pass --stage1_run or --checkpoint")
        stage1_run = run.info.run_id
    # The floors of the profile the weights were trained with; --profile only when none recorded.
    judged_by = (recorded_profile(checkpoint=checkpoint) if checkpoint is not None
                 else recorded_profile(run_id=stage1_run)) or profile
    gate_cfg = C.build(C.GateConfig, judged_by, {"min_final_loss": auto(min_final_loss, float),
                                                 "max_lr": auto(max_lr, float)})
    with stage_run("validate"):
        log_new_params({**C.flatten(gate_cfg), "stage1_run": stage1_run or "",
                        "checkpoint": checkpoint or "", "gate_profile": judged_by})
        if checkpoint is not None:
            source_run, (evidence, _) = None, checkpoint_evidence(checkpoint, judged_by, data)
            path, sha = checkpoint, sha256_file(checkpoint)
        else:
            source_run = stage1_run
            evidence, path = run_evidence(stage1_run)
            sha = evidence.sha256_actual
        verdict = evaluate_gate(evidence, gate_cfg)
        log_dict(verdict.to_dict() | {"evidence": evidence.__dict__}, "gate_report.json")
        log_metrics({f"gate.{r.name}.passed": float(r.passed) for r in verdict.rules} |
                           {f"gate.{r.name}.value": float(r.value) for r in verdict.rules
                            if isinstance(r.value, (int, float))})
        # The registry first: when it does not answer, this run fails with no verdict tagged.
        version = None
        if not verdict.approved:
            reject_stage1(source_run, verdict.reasons, None if source_run else sha)
        else:
            tags = {"objective": str(evidence.objective), "lr": str(evidence.lr),
                    "final_train_loss": str(evidence.final_train_loss),
                    "checkpoint_sha256": sha or "",
                    **{f"health_{k}": f"{v:.4g}" for k, v in evidence.health.items()}}
            version = promote_vision_bridge(path, source_run, tags)
            if source_run:
                mark_approved(source_run)
        name_run(f"validate -> {'approved' if verdict.approved else 'rejected'}")
        set_run_tags({"gate.verdict": "approved" if verdict.approved else "rejected",
                      "gate.reasons": "; ".join(verdict.reasons)[:4900],
                      "gate.source_run": source_run or "", "gate.checkpoint_sha256": sha or "",
                      **({"gate.version": version} if version else {})})
        if verdict.approved:
            click.echo(f"approved: models:/vision-bridge@stage2-ready -> version {version}")
        else:
            click.echo(f"error: gate rejected {source_run or checkpoint}: "
                       f"{'; '.join(verdict.reasons)}", err=True)
    if not verdict.approved:
        sys.exit(EXIT_REFUSED)


if __name__ == "__main__":
    main()
