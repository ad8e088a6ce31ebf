"""Dataset profile, content digest and the records frame."""
from __future__ import annotations

import dataclasses
import shutil

import pytest

from pipeline.data import (FINDINGS, dataset_digest, dataset_profile, generate_synthetic,
                           load_records, records_frame)

TINY = {"n_train": 12, "n_val": 4, "n_test": 4, "image_size": 32}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn"), seed=0, **TINY)


def test_profile_counts_lengths_and_findings(synthetic):
    records = load_records(synthetic)
    profile = dataset_profile(records)
    assert profile["n_studies"] == {"train": 12, "val": 4, "test": 4}
    assert profile["n_images"] == {"train": 12, "val": 4, "test": 4}
    words = profile["report_words"]["all"]
    assert 20 <= words["min"] <= words["p10"] <= words["p50"] <= words["p90"] <= words["max"] <= 90
    for split, recs in records.items():
        stored = {f: sum(r.labels[f] for r in recs) for f in FINDINGS}
        assert profile["finding_counts"][split] == stored
        assert profile["label_agreement"][split] == 1.0


def test_profile_of_empty_split_and_unlabelled_records(synthetic):
    records = load_records(synthetic)
    unlabelled = {"train": [dataclasses.replace(r, labels=None) for r in records["train"]],
                  "val": []}
    profile = dataset_profile(unlabelled)
    assert profile["n_studies"] == {"train": 12, "val": 0}
    assert profile["report_words"]["val"] == {}
    assert profile["label_agreement"] == {"train": None, "val": None}


def test_digest_is_stable_and_independent_of_location(synthetic, tmp_path):
    records = load_records(synthetic)
    digest = dataset_digest(records)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert dataset_digest(load_records(synthetic)) == digest
    copy = shutil.copytree(synthetic.parent, tmp_path / "moved")
    assert dataset_digest(load_records(copy / "annotation.json")) == digest


def test_digest_changes_with_report_image_or_split(synthetic, tmp_path):
    records = load_records(synthetic)
    digest = dataset_digest(records)
    edited = dict(records, train=[dataclasses.replace(records["train"][0], report="Changed.")]
                  + records["train"][1:])
    assert dataset_digest(edited) != digest
    moved = dict(records, train=records["train"][1:], val=records["val"] + records["train"][:1])
    assert dataset_digest(moved) != digest
    copy = shutil.copytree(synthetic.parent, tmp_path / "copy")
    image = copy / "images" / "SYN-00000" / "0.png"
    shutil.copy(copy / "images" / "SYN-00001" / "0.png", image)
    assert dataset_digest(load_records(copy / "annotation.json")) != digest


def test_records_frame(synthetic):
    records = load_records(synthetic)
    frame = records_frame(records)
    assert list(frame.columns) == ["id", "split", "report", "image_path"]
    assert len(frame) == 20
    assert frame["split"].value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}
    assert frame.loc[0, "image_path"] == records["train"][0].image_paths[0]
