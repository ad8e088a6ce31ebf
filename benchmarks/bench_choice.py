"""Which report to write: the top beam, or the candidate whose findings agree with the head's.

    .venv/bin/python benchmarks/bench_choice.py CHECKPOINT [--split test] [--samples 6]

CHECKPOINT is a Stage 2 checkpoint with a finding head (outputs/stage2/<run>/checkpoints/
vision_bridge_vlm_final.safetensors). One decoding of the split gives 3 beams and `--samples`
sampled reports (temperature 0.7, seeded) per image; the rows choose from prefixes of that
candidate list, so every row reads the same texts. Columns: coarse and fine finding macro F1,
the report's share of the head's coarse F1, BLEU-4, CIDEr. No MLflow.
"""
from __future__ import annotations

import time

import click
import torch


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--beams", default=3, show_default=True)
@click.option("--samples", default=6, show_default=True)
def main(checkpoint, split, beams, samples):
    """Print the top beam beside choices by findings among more and more candidates."""
    from pipeline.data import image_batch, load_dataset
    from pipeline.evaluate.scoring import score_reports
    from pipeline.data.finding_metrics import label_f1
    from pipeline.models.loading import load_report_model
    from pipeline.models.report_model import choose_reports

    report_model = load_report_model(checkpoint)
    records = load_dataset(report_model.cfg.data)[split]
    references = [r.report for r in records]
    images = image_batch(records, report_model.cfg.encoder.image_size)
    head = label_f1(references, report_model.predicted_findings(images))
    ceiling = head["finding_coarse_macro_f1"]
    started = time.perf_counter()
    candidates, given = report_model.candidates(images, num_beams=beams, samples=samples,
                                                seed=report_model.cfg.seed)
    minutes = (time.perf_counter() - started) / 60
    rows = [("top beam", 1), (f"chosen among {beams} beams", beams)] + \
        [(f"chosen among {beams} beams + {k} samples", beams + k)
         for k in sorted({min(3, samples), samples}) if k]
    click.echo(f"{len(records)} {split} studies, {beams} beams + {samples} samples decoded in "
               f"{minutes:.1f} min; head alone: coarse {ceiling:.3f}, "
               f"fine {head['finding_macro_f1']:.3f}\n")
    click.echo("| written | coarse F1 | fine F1 | share of head's coarse | BLEU-4 | CIDEr |")
    click.echo("|---|---|---|---|---|---|")
    for name, n in rows:
        chosen = choose_reports([options[:n] for options in candidates], given)
        s = score_reports(references, chosen, meteor=False)
        click.echo(f"| {name} | {s['finding_coarse_macro_f1']:.3f} | {s['finding_macro_f1']:.3f} | "
                   f"{s['finding_coarse_macro_f1'] / ceiling:.2f} | {s['bleu4']:.3f} | "
                   f"{s['cider']:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
