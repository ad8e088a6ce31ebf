"""Which decode threshold for the finding head: grounding gap and head F1 per threshold.

    .venv/bin/python benchmarks/bench_thresholds.py CHECKPOINT [--thresholds 0.3,0.4,0.5]

CHECKPOINT is a Stage 2 checkpoint with a finding head (outputs/stage2/<run>/checkpoints/
vision_bridge_vlm_final.safetensors). Rows: each global threshold, then one threshold per head
output chosen on the validation split (max F1; outputs with fewer than --min-positives
positives there keep 0.5). Columns: the grounding gap and the head's coarse and fine macro F1,
on validation and on test. A threshold t is applied by shifting the head's bias by -logit(t)
(sigmoid(l - logit(t)) >= 0.5 exactly when sigmoid(l) >= t; for the fine outputs l is the
logit less the head's `fine_prior`, as decoding has it), so the gap runs through the
unchanged inference path. No MLflow.
"""
from __future__ import annotations

import math

import click
import torch

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _split(report_model, records) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images, reports, finding logits at the saved head) of one split."""
    from pipeline.data import image_batch

    images = image_batch(records, report_model.cfg.encoder.image_size)
    with torch.no_grad():
        logits = report_model.model.forward_with_findings(images)[1]
    return images, [r.report for r in records], logits


def _chosen_on_validation(reports, logits, fine_prior: torch.Tensor,
                          min_positives: int) -> torch.Tensor:
    """Per-output threshold with the best validation F1 (ties: the one nearest 0.5), on the
    probabilities decoding compares: the fine ones with the head's prior taken off."""
    from pipeline.models.findings import HEAD_OUTPUTS, decision_logits, finding_targets

    probs = torch.sigmoid(decision_logits(logits, fine_prior))
    targets = finding_targets(reports) > 0
    chosen = torch.full((HEAD_OUTPUTS,), 0.5)
    for i in range(HEAD_OUTPUTS):
        if int(targets[:, i].sum()) < min_positives:
            continue

        def f1(t: float, i: int = i) -> tuple[float, float]:
            hyp = probs[:, i] >= t
            denominator = int(hyp.sum() + targets[:, i].sum())
            return (2 * int((hyp & targets[:, i]).sum()) / max(1, denominator), -abs(t - 0.5))
        chosen[i] = max(GRID, key=f1)
    return chosen


def _scores(report_model, images, reports, logits, thresholds) -> dict[str, float]:
    """Gap and head F1 with `thresholds` (one per head output) as the decode thresholds."""
    from pipeline.data.finding_metrics import label_f1

    shift = torch.tensor([_logit(float(t)) for t in thresholds])
    f1 = label_f1(reports, report_model.model.decode_findings(logits - shift))
    bias = report_model.model.finding_head.linear.bias  # the gap runs the model itself
    saved = bias.detach().clone()
    with torch.no_grad():
        bias -= shift.to(bias.dtype)
    try:
        _, gap = report_model.grounding_gap(images, reports)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    return {"gap": gap, "coarse": f1["finding_coarse_macro_f1"], "fine": f1["finding_macro_f1"]}


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--thresholds", default="0.3,0.4,0.5", show_default=True)
@click.option("--min-positives", default=2, show_default=True,
              help="validation positives an output needs for its own threshold")
def main(checkpoint: str, thresholds: str, min_positives: int) -> None:
    from pipeline.data import load_dataset
    from pipeline.models.findings import HEAD_OUTPUTS
    from pipeline.models.loading import load_report_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    report_model = load_report_model(checkpoint)
    if not getattr(report_model.model, "has_findings", False):
        raise click.UsageError(f"{checkpoint} has no finding head")
    report_model.model.eval()
    records = load_dataset(report_model.cfg.data)
    splits = {name: _split(report_model, records[name]) for name in ("val", "test")}
    rows = {f"{float(t):.2f}": torch.full((HEAD_OUTPUTS,), float(t))
            for t in thresholds.split(",")}
    prior = report_model.model.finding_head.fine_prior
    rows["per output, chosen on val"] = _chosen_on_validation(*splits["val"][1:], prior,
                                                              min_positives)
    print("| threshold | gap val / test | head coarse F1 val / test | head fine F1 val / test |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        val, test = (_scores(report_model, *splits[s], row) for s in ("val", "test"))
        print(f"| {name} | {val['gap']:.3f} / {test['gap']:.3f} | {val['coarse']:.3f} / "
              f"{test['coarse']:.3f} | {val['fine']:.3f} / {test['fine']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
