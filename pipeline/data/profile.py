"""Dataset profile (sizes, report lengths, finding frequencies), content digest, and a frame.

`records_frame` gives the table the tracking code hands to `mlflow.data.from_pandas` with
`dataset_digest` as its digest; nothing here imports mlflow.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.checkpoint import sha256_file
from pipeline.data.dataset import Record
from pipeline.data.labeler import FINDINGS, label_report

RecordsBySplit = Mapping[str, Sequence[Record]]


def _word_stats(reports: list[str]) -> dict[str, float]:
    words = np.array([len(r.split()) for r in reports], dtype=np.float64)
    if words.size == 0:
        return {}
    p10, p50, p90 = np.percentile(words, [10, 50, 90])
    return {"min": int(words.min()), "mean": round(float(words.mean()), 2),
            "max": int(words.max()), "p10": round(float(p10), 2), "p50": round(float(p50), 2),
            "p90": round(float(p90), 2)}


def dataset_profile(records_by_split: RecordsBySplit) -> dict:
    """Counts, report word-length stats and labeler finding counts per split (JSON-ready).

    `label_agreement` is the share of studies whose stored labels equal the labeler's reading
    (None where a split has no stored labels); on the synthetic set it should be 1.0.
    """
    profile: dict = {"n_studies": {}, "n_images": {}, "report_words": {}, "finding_counts": {},
                     "label_agreement": {}}
    for split, records in records_by_split.items():
        read = [label_report(r.report) for r in records]
        profile["n_studies"][split] = len(records)
        profile["n_images"][split] = sum(len(r.image_paths) for r in records)
        profile["report_words"][split] = _word_stats([r.report for r in records])
        profile["finding_counts"][split] = {f: sum(labels[f] for labels in read) for f in FINDINGS}
        stored = [(r.labels, labels) for r, labels in zip(records, read) if r.labels is not None]
        profile["label_agreement"][split] = (
            round(sum(a == {k: b[k] for k in a} for a, b in stored) / len(stored), 4)
            if stored else None)  # over the stored names (the labeler also reads unlocalised)
    all_reports = [r.report for records in records_by_split.values() for r in records]
    profile["report_words"]["all"] = _word_stats(all_reports)
    return profile


def dataset_digest(records_by_split: RecordsBySplit, length: int = 16) -> str:
    """Short sha256 hex over (split, id, report, image bytes), sorted; independent of paths."""
    digest = hashlib.sha256()
    rows = sorted((split, r.id, r.report, r.image_paths)
                  for split, records in records_by_split.items() for r in records)
    for split, study_id, report, paths in rows:
        images = [sha256_file(p) for p in paths]
        digest.update(json.dumps([split, study_id, report, images]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:length]


def records_frame(records_by_split: RecordsBySplit) -> pd.DataFrame:
    """One row per study: id, split, report, image_path (views joined with ';')."""
    rows = [{"id": r.id, "split": split, "report": r.report, "image_path": ";".join(r.image_paths)}
            for split, records in records_by_split.items() for r in records]
    return pd.DataFrame(rows, columns=["id", "split", "report", "image_path"])
