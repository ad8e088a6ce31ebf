"""Evaluation: generate reports for a split (greedy and beam search) and score them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.data import ImageReportDataset, collate, load_dataset
from pipeline.models.loading import load_report_model


@dataclass
class EvalOutcome:
    """Metrics, the id/reference/generated table and the per-finding F1 figure."""

    metrics: dict
    table: pd.DataFrame
    figure: Path
    score_definition: str


def _generate_all(report_model, records, num_beams: int, max_new_tokens, batch_size: int = 8):
    dataset = ImageReportDataset(records, report_model.cfg.encoder.image_size)
    out = []
    label = "greedy" if num_beams == 1 else f"beam{num_beams}"
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"generate ({label})", unit="batch"):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        with torch.no_grad():
            out += report_model.generate(batch["images"], num_beams=num_beams,
                                         max_new_tokens=max_new_tokens)
    return out


def evaluate_model(checkpoint, data: str = "synthetic", image_dir=None, split: str = "test",
                   num_beams: int = 3, max_new_tokens=None, limit=None, out_dir="outputs/evaluate",
                   report_model=None, meteor: bool = True) -> EvalOutcome:
    """Score greedy (and, if num_beams > 1, beam) reports of a Stage 2 checkpoint on a split."""
    from pipeline.evaluate.scoring import (DEFAULT_SCORE_WEIGHTS, composite_score, per_finding_f1_figure,
                                  score_reports)

    report_model = report_model or load_report_model(checkpoint)
    data_cfg = report_model.cfg.data if data == "synthetic" else \
        replace(report_model.cfg.data, source=data, image_dir=image_dir)
    records = load_dataset(data_cfg)[split][:limit]
    if not records:
        raise ValueError(f"split {split!r} of {data!r} is empty")
    references = [r.report for r in records]
    table = pd.DataFrame({"id": [r.id for r in records], "reference": references})
    metrics: dict[str, float] = {}
    decodings = [("greedy", 1)] + ([("beam", num_beams)] if num_beams > 1 else [])
    best = None
    for name, beams in decodings:
        generated = _generate_all(report_model, records, beams, max_new_tokens)
        table[f"generated_{name}"] = generated
        scores = score_reports(references, generated, meteor=meteor)
        metrics.update({f"{name}_{k}": float(v) for k, v in scores.items()})
        best = scores  # the last decoding (beam when run) picks the champion
    weights = DEFAULT_SCORE_WEIGHTS
    definition = " + ".join(f"{w:g}*{k}" for k, w in weights.items()) + \
        f" ({decodings[-1][0]} decoding)"
    metrics["score"] = composite_score(best, weights)
    figure = per_finding_f1_figure(best, Path(out_dir) / "finding_f1.png")
    return EvalOutcome(metrics, table, figure, definition)
