"""What the finding head learns in Stage 1: its coarse F1 per group for Stage 1 configs side by side.

    .venv/bin/python benchmarks/bench_head.py [--profile demo] [--data synthetic-v2]
        [--rows '{"name": {"config.key": value, ...}, ...}']

Each row trains Stage 1 (the `findings` objective) on the profile with the row's overrides
(dotted `Stage1Config` keys, as `pipeline.config.build` takes them), in a temporary tracking
store and output folder, one after the other, then prints its training time (the data is
generated before the clock starts) and the head's coarse
macro F1 on the validation and test splits with each group's test F1. A row that changes
`data.n_train` trains and is scored on that dataset (the generator draws studies by index,
so its validation and test studies are others). Run nothing else meanwhile: the times are
what the rows cost.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click

ROWS = {
    "demo (254 studies, 35 epochs)": {"data.n_train": 254, "epochs": 35},
    "patch 8 (4x the tokens)": {"data.n_train": 254, "epochs": 35, "encoder.patch_size": 8},
    "d_model 128, depth 3": {"data.n_train": 254, "epochs": 35, "encoder.d_model": 128,
                             "encoder.depth": 3},
    "1000 studies, 8 epochs": {"data.n_train": 1000, "epochs": 8},
    "1000 studies, 12 epochs": {"data.n_train": 1000, "epochs": 12},
}


def _head_scores(checkpoint: Path, cfg) -> dict[str, tuple[float, dict[str, float]]]:
    """{split: (coarse macro F1, {group: F1})} of the checkpoint's head on val and test."""
    import torch

    from pipeline.data import load_dataset
    from pipeline.data.finding_metrics import macro_f1, per_label_f1
    from pipeline.data.labeler import COARSE_FINDINGS, coarse_labels, to_coarse
    from pipeline.models.loading import load_vision_bridge
    from pipeline.train.split_pass import split_findings

    model, _, _ = load_vision_bridge(str(checkpoint), cfg, torch.device("cpu"))
    records = load_dataset(cfg.data)
    out = {}
    for split in ("val", "test"):
        predicted = split_findings(model, records[split], cfg.encoder.image_size)
        table = per_label_f1([coarse_labels(r.report) for r in records[split]],
                             [to_coarse(p) for p in predicted], COARSE_FINDINGS)
        out[split] = (macro_f1(table), {k: table[k]["f1"] for k in COARSE_FINDINGS})
    return out


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--profile", default="demo", show_default=True)
@click.option("--data", default="synthetic-v2", show_default=True)
@click.option("--rows", default=None, help="JSON {name: {key: value}}; default: the table's rows")
def main(profile: str, data: str, rows: str | None) -> None:
    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.stage1.job import Stage1Job

    chosen = json.loads(rows) if rows else ROWS
    with tempfile.TemporaryDirectory(prefix="bench_head_") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        lines = []
        for i, (name, overrides) in enumerate(chosen.items()):
            out = Path(tmp) / f"row{i}"
            cfg = C.build(C.Stage1Config, profile, {"data.source": data, "output_dir": str(out),
                                                     **overrides})
            load_dataset(cfg.data)  # generated before the clock starts
            start = time.perf_counter()
            Stage1Job(cfg, profile=profile, echo=lambda message: None).run()
            seconds = time.perf_counter() - start
            checkpoint = next(out.glob("*/checkpoints/vision_bridge_final.safetensors"))
            scores = _head_scores(checkpoint, cfg)
            groups = " ".join(f"{k[:6]} {v:.2f}" for k, v in scores["test"][1].items())
            lines.append(f"| {name} | {seconds:.0f} s | {scores['val'][0]:.3f} | "
                         f"{scores['test'][0]:.3f} | {groups} |")
            click.echo(lines[-1])
    click.echo("\n| Stage 1 | time | val coarse F1 | test coarse F1 | test F1 per group |")
    click.echo("|---|---|---|---|---|")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
