"""The rule-based labeler: exact agreement with the generator, and free-text reports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data import FINDINGS, generate_synthetic, label_report
from pipeline.data.labeler import UNLOCALISED
from pipeline.data.synthetic import sample_study, write_report


def _placed(labels: dict) -> dict:
    """Stored labels as the labeler reads them: the generator always places its findings."""
    return {**dict.fromkeys(UNLOCALISED, 0), **labels}


def _positives(text: str) -> set[str]:
    return {name for name, value in label_report(text).items() if value}


@pytest.mark.parametrize("seed, version", [(0, 1), (1, 1), (7, 1), (0, 2), (7, 2)])
def test_agrees_with_stored_labels_on_every_generated_entry(tmp_path, seed, version):
    path = generate_synthetic(tmp_path, seed=seed, image_size=16, version=version)
    entries = [e for split in json.loads(path.read_text()).values() for e in split]
    assert len(entries) == 350
    wrong = [(e["id"], e["report"]) for e in entries if label_report(e["report"]) != _placed(e["labels"])]
    assert not wrong


@pytest.mark.parametrize("version", [1, 2])
def test_agrees_with_the_generator_over_many_studies(version):
    for seed in range(3):
        for index in range(1500):
            rng = np.random.default_rng([seed, index])
            study = sample_study(rng, version)
            report = write_report(study, rng, version)
            assert label_report(report) == _placed(study.labels()), report
            cleaned = " ".join(report.lower().replace(".", " .").replace(",", " ,").split())
            assert label_report(cleaned) == _placed(study.labels()), cleaned  # R2Gen-cleaned form


@pytest.mark.parametrize("report, expected", [
    ("The heart is enlarged. No pleural effusion or pneumothorax.", {"cardiomegaly"}),
    ("the heart is enlarged . no effusion . lungs are clear .", {"cardiomegaly"}),
    ("Heart size is normal. Small left pleural effusion without pneumothorax.",
     {"effusion_left"}),
    ("No evidence of focal consolidation, pneumothorax, or pleural effusion. "
     "No acute cardiopulmonary abnormality.", {"no_finding"}),
    ("Lungs are free of consolidation. Negative for pneumothorax. Heart is not enlarged.",
     {"no_finding"}),
    ("Previously seen right pneumothorax has resolved. Left effusion and right pneumothorax "
     "are no longer seen.", {"no_finding"}),
    ("blunting of the right costophrenic angle . no pneumothorax .", {"effusion_right"}),
    ("Effusion on the left and pneumothorax on the right.",
     {"effusion_left", "pneumothorax_right"}),
    ("The left hemidiaphragm is elevated and there is a nodule in the right upper lobe.",
     {"nodule_right_upper"}),
    ("Right middle lobe pneumonia. Bilateral pleural effusions. No pericardial effusion.",
     {"consolidation_right_middle", "effusion_left", "effusion_right"}),
    ("Lingular airspace disease; pneumothorax on the right cannot be excluded.",
     {"consolidation_left_middle", "pneumothorax_right"}),
    ("No change in the small right pleural effusion.", {"effusion_right"}),
    ("There is no pneumothorax, there is a small left effusion.", {"effusion_left"}),
    ("IMPRESSION: 2.5 cm mass in the left lower zone; no cardiomegaly.", {"nodule_left_lower"}),
    ("The heart is enlarged and the pneumothorax is not seen.", {"cardiomegaly"}),
    ("No effusion, but moderate cardiomegaly.", {"cardiomegaly"}),
    ("Cardiac silhouette within normal limits. Lungs clear bilaterally.", {"no_finding"}),
    ("", {"no_finding"}),
    # CheXpert's own name for the observation, as a prompt or a report may say it.
    ("Left hazy lung opacity. Lung opacity at the right base.", {"opacity_left", "opacity_right"}),
    ("No focal lung opacity.", {"no_finding"}),
    # An opacity placed in a lung or on a side, and named as nothing else, is a lung opacity.
    ("Mild opacity in the left lung. Right-sided opacity.", {"opacity_left", "opacity_right"}),
    ("Rounded opacity in the left mid zone, likely a nodule.", {"nodule_left_middle"}),
    ("Nodular opacity in the right lung.", {"nodule_unlocalised"}),
    ("No opacity in the right lung.", {"no_finding"}),
])
def test_reads_hand_written_reports(report, expected):
    assert _positives(report) == expected


def test_side_or_zone_that_cannot_be_read_is_an_unlocalised_finding():
    assert _positives("There is a pleural effusion.") == {"effusion_unlocalised"}
    assert _positives("A nodule in the left lung.") == {"nodule_unlocalised"}


def test_returns_every_finding_in_order():
    labels = label_report("Normal chest.")
    assert tuple(labels) == (*FINDINGS[:-1], *UNLOCALISED, "no_finding")
    assert set(labels.values()) <= {0, 1}


@pytest.mark.parametrize("report, expected", [
    ("There is a large pleural effusion.", {"effusion"}),
    ("Pneumothorax.", {"pneumothorax"}),
    ("A nodule in the left lung.", {"nodule"}),
    ("Patchy consolidation. The heart is enlarged.", {"consolidation", "cardiomegaly"}),
    ("No pleural effusion. No pneumothorax.", {"no_finding"}),
    ("Small left pleural effusion. Nodule in the right upper zone.", {"effusion", "nodule"}),
    ("", {"no_finding"}),
])
def test_coarse_labels_count_unlocalised_findings(report, expected):
    from pipeline.data import COARSE_FINDINGS, coarse_labels

    labels = coarse_labels(report)
    assert tuple(labels) == COARSE_FINDINGS
    assert {k for k, v in labels.items() if v} == expected


def test_coarse_labels_agree_with_fine_labels_on_generated_reports():
    from pipeline.data import coarse_labels, to_coarse

    for index in range(600):
        rng = np.random.default_rng([3, index])
        study = sample_study(rng)
        report = write_report(study, rng)
        assert coarse_labels(report) == to_coarse(study.labels()), report


@pytest.mark.parametrize("report, expected", [
    ("The nasogastric tube has been removed.", {"no_finding"}),
    ("Status post removal of the endotracheal tube.", {"no_finding"}),
    ("Interval removal of the right central venous catheter.", {"no_finding"}),
    ("The feeding tube was removed.", {"no_finding"}),
    ("Removal of the PICC line. The lungs are clear.", {"no_finding"}),
    ("The endotracheal tube is no longer seen.", {"no_finding"}),
    # A device removed beside one that stays: only the removed one is read as gone.
    ("The endotracheal tube has been removed; the nasogastric tube remains in the stomach.",
     {"devices_tube"}),
    ("The central line has been removed. Pacemaker in place.", {"devices_pacemaker"}),
    # A removal negates devices only.
    ("Interval removal of the right chest tube with right basilar atelectasis.",
     {"atelectasis_right"}),
])
def test_removed_devices_are_not_present(report, expected):
    assert _positives(report) == expected
