"""Data layer: loaders and validation, the synthetic benchmark, the report labeler, profiling.

Names are re-exported lazily (PEP 562) so that `python -m pipeline.data.synthetic` neither
imports torch nor runs its own module twice.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataError": "dataset", "Record": "dataset", "load_records": "dataset",
    "load_dataset": "dataset", "ImageReportDataset": "dataset", "collate": "dataset",
    "image_batch": "dataset", "image_batches": "dataset",
    "decode_bytes": "images", "decode_file": "images", "ImageDecodeError": "images",
    "model_input": "images",
    "FINDINGS": "labeler", "label_report": "labeler", "COARSE_FINDINGS": "labeler",
    "coarse_labels": "labeler", "to_coarse": "labeler",
    "dataset_profile": "profile", "dataset_digest": "profile", "records_frame": "profile",
    "generate_synthetic": "synthetic",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from pipeline.data.dataset import (DataError, ImageReportDataset, Record, collate,
                                       image_batch, image_batches, load_dataset,
                                       load_records)
    from pipeline.data.images import ImageDecodeError, decode_bytes, decode_file, model_input
    from pipeline.data.labeler import (COARSE_FINDINGS, FINDINGS, coarse_labels, label_report,
                                       to_coarse)
    from pipeline.data.profile import dataset_digest, dataset_profile, records_frame
    from pipeline.data.synthetic import generate_synthetic


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
