"""main: data -> stage1 -> validate -> stage2 -> evaluate, as one parent run with child runs.

A finished child run whose parameters (as strings) match, from the same source tree (a hash of
the `.py` files of `pipeline/` and `steps/`) and the same data (a digest of the data's content),
is reused, so a rerun after a crash does only what is missing. When the gate rejects Stage 1, Stage 2 starts from
scratch (said loudly) unless `--stop_on_reject`.
"""
from __future__ import annotations

import os
import sys

import click

from pipeline import config as C
from pipeline.data import dataset_digest, load_dataset
from pipeline.guards import GuardError
from pipeline.tracking.registry import VISION_MODEL, run_verdict, vision_version_of_run
from pipeline.tracking.runs import (REUSE_TAGS, StepFailed, artifact_uri, find_reusable_run,
                                    log_metrics, log_new_params, name_run, run_entry_point,
                                    run_metrics, run_tags, set_run_tags, shown_uri,
                                    source_digest, stage_run, tag_run, tracking_uri, view_hint)
from steps.common import device_option, one_line_errors, profile_option


def _step(name: str, params: dict, key: dict, allow_fail: bool = False):
    params = {k: str(v) for k, v in params.items()}
    reused = find_reusable_run(name, params, key)
    if reused is not None:
        click.echo(f"[main] {name}: reusing finished run {reused.info.run_id}", err=True)
        return reused.info.run_id, True
    click.echo(f"[main] {name}: running with {params}", err=True)
    try:
        run_id = run_entry_point(name, params)
        tag_run(run_id, key)
        return run_id, True
    except StepFailed:
        if not allow_fail:
            raise
        return None, False


@click.command()
@profile_option
@click.option("--data", default="synthetic", show_default=True)
@click.option("--objective", type=click.Choice(["auto", "findings", "vicreg", "l2_proxy"]),
              default="auto", show_default=True, help="Stage 1's; auto = findings")
@click.option("--uncertain", type=click.Choice(["auto", "positive", "negative", "ignore"]),
              default="auto", show_default=True,
              help="the finding head's uncertain mentions, in Stage 1 and Stage 2: auto = "
                   "positive (U-ones), negative (U-zeros) or ignore (masked from the loss)")
@click.option("--stage1_lr", "--stage1-lr", default="auto", show_default=True,
              help="auto = 1e-3 (the original recipe: vicreg at 1e-5)")
@click.option("--stage2_lr", "--stage2-lr", default="auto", show_default=True,
              help="the bridge's; auto = 1e-3 (the original recipe: 2e-5)")
@click.option("--llm", default="auto", show_default=True,
              help="auto = the profile's LLM (tiny: tiny-random; demo, default: smollm2)")
@click.option("--nproc", default="1", show_default=True,
              help="processes for stage1 and stage2 (above 1: torchrun, DDP)")
@click.option("--stop_on_reject", "--stop-on-reject", is_flag=True)
@device_option
@one_line_errors
def main(profile, data, objective, uncertain, stage1_lr, stage2_lr, llm, nproc, stop_on_reject,
         device):
    """Run the whole pipeline; print the metrics, where results are and how to look."""
    # Child steps run `python -m steps.X` (MLproject); make that this interpreter.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    records = load_dataset(C.build(C.Stage1Config, profile, {"data.source": data}).data)
    digest = dataset_digest(records)
    key = dict(zip(REUSE_TAGS, (source_digest(), digest)))  # what a reused run must share
    with stage_run("main") as parent:
        name_run(f"main {profile}")
        set_run_tags({"data.digest": digest, **key})
        log_new_params({"profile": profile, "data": data, "data.digest": digest,
                        "objective": objective, "uncertain": uncertain,
                        "stage1_lr": stage1_lr, "stage2_lr": stage2_lr,
                        "llm": llm, "nproc": nproc, "device": device})
        common = {"profile": profile, "data": data, "device": device}
        # a reused run was trained on as many ranks, with the same uncertain policy
        training = {**common, "nproc": nproc, "uncertain": uncertain}
        s1, _ = _step("stage1", {**training, "objective": objective, "lr": stage1_lr}, key)
        _, approved = _step("validate", {"stage1_run": s1, "profile": profile}, key,
                            allow_fail=True)
        approved = approved and run_verdict(s1) == "approved"
        # The version registered from THIS Stage 1 run (the alias may have moved since), pinned
        # so that a later Stage 1 changes Stage 2's reuse key.
        version = vision_version_of_run(s1) if approved else None
        if approved and version is None:
            raise GuardError(f"Stage 1 run {s1} was approved but no {VISION_MODEL} version "
                             "was registered from it")
        if approved:
            init = f"models:/{VISION_MODEL}/{version}"
        elif stop_on_reject:
            raise GuardError(f"the gate rejected Stage 1 run {s1} (see its gate.reasons tag)")
        else:
            init = "scratch"
            click.echo("!" * 70 + f"\n[main] THE GATE REJECTED STAGE 1 RUN {s1}: STAGE 2 STARTS "
                       "FROM SCRATCH (as advised: do not initialise from collapsed features)\n"
                       + "!" * 70, err=True)
        set_run_tags({"main.stage2_init": init})
        s2, _ = _step("stage2", {**training, "lr": stage2_lr, "llm": llm, "init": init}, key)
        ev, _ = _step("evaluate", {**common, "model": s2}, key)
        _summary(parent.info.run_id, s1, s2, ev)


SUMMARY_KEYS = ("bleu4", "cider", "rouge_l", "finding_macro_f1", "finding_coarse_macro_f1",
                "chexpert_micro_f1", "chexpert_macro_f1", "report_form", "contradiction_share",
                "preamble_share", "distinct_share")


def _summary(parent_id: str, s1: str, s2: str, ev: str) -> None:
    metrics = run_metrics(ev)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items())
             if (k.startswith(("beam_", "greedy_", "blind_"))
                 and k.split("_", 1)[1] in SUMMARY_KEYS)
             or k == "grounding_gap"}
    log_metrics({f"eval_{k}": v for k, v in shown.items()})
    click.echo("\n== pipeline finished ==")
    click.echo(f"runs: main {parent_id} | stage1 {s1} | stage2 {s2} | evaluate {ev}")
    click.echo(f"final metrics: {shown} score={metrics.get('score', float('nan')):.4f}")
    click.echo(f"champion: {run_tags(ev).get('champion.verdict', 'not judged')} "
               f"{run_tags(ev).get('champion.reasons', '')}".rstrip())
    click.echo(f"artifacts: {shown_uri(artifact_uri(s2))} (Stage 2), "
               f"{shown_uri(artifact_uri(ev))} (evaluation); outputs/ holds local copies")
    click.echo(f"tracking store: {shown_uri(tracking_uri(raw=True))}")
    click.echo(f"see them: {view_hint()}")


if __name__ == "__main__":
    sys.exit(main())
