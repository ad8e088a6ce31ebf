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
    # Airspace disease is CheXpert's Lung Opacity (its mention list), not a consolidation.
    ("Lingular airspace disease; pneumothorax on the right cannot be excluded.",
     {"opacity_left", "pneumothorax_right"}),
    ("Lingular consolidation; pneumothorax on the right cannot be excluded.",
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


def _cleaned(report: str) -> str:
    return " ".join(report.lower().replace(".", " .").replace(",", " ,").split())


@pytest.mark.parametrize("version", [1, 2])
def test_one_engine_reads_every_generated_study_as_the_generator_intended(version):
    """Fine and coarse labels, raw and R2Gen-cleaned, over 2000 studies of each version: the
    labels the generator stored (which the labeler before the CheXpert engine also read)."""
    from pipeline.data import coarse_labels, to_coarse

    for index in range(2000):
        rng = np.random.default_rng([11, index])
        study = sample_study(rng, version)
        report = write_report(study, rng, version)
        for text in (report, _cleaned(report)):
            assert label_report(text) == _placed(study.labels()), text
            assert coarse_labels(text) == to_coarse(study.labels()), text


def test_real_style_report_gives_the_head_an_opacity_and_a_device_target():
    from pipeline.models.findings import COARSE, FINE, finding_targets

    targets = finding_targets(["Streaky bibasilar opacities. Right IJ catheter tip in the SVC."])
    on = {name for name, value in zip((*FINE, *COARSE), targets[0].tolist()) if value}
    assert {"opacity", "devices"} <= on
    assert on == {"opacity_left", "opacity_right", "devices_line", "opacity", "devices"}


def test_finding_labels_read_only_the_engines_mentions(monkeypatch):
    from pipeline.data import labeler

    monkeypatch.setattr(labeler, "read_mentions", lambda text: [])
    labeler._read.cache_clear()
    try:
        assert _positives("Right pleural effusion. Endotracheal tube in place.") == {"no_finding"}
    finally:
        labeler._read.cache_clear()


@pytest.mark.parametrize("report", [
    "Streaky bibasilar opacities. Right IJ catheter tip in the SVC.",
    "Right lower lobe opacity, likely pneumonia.",
    "Left basilar opacity may represent atelectasis versus pneumonia.",
    "Calcified granuloma in the right upper lobe.",
    "Sternotomy wires and mediastinal clips. Mild cardiomegaly.",
    "Pneumothorax is unlikely. Mild pulmonary vascular congestion.",
    "Heart size is upper limits of normal. Patchy left lower lobe airspace disease.",
    "The nasogastric tube has been removed. Small bilateral pleural effusions.",
])
def test_each_finding_group_is_its_chexpert_observation(report):
    """A group is present only where CheXpert's labels (the same engine) have its observation
    positive or uncertain (consolidation: Consolidation or Pneumonia)."""
    from pipeline.data.chexpert import NEGATIVE, label_chexpert
    from pipeline.data.labeler import CHEXPERT_OF, coarse_labels

    read = label_chexpert(report)
    for group, value in coarse_labels(report).items():
        if value and group != "no_finding":
            names = [CHEXPERT_OF[group]] + ["Pneumonia"] * (group == "consolidation")
            assert any(read[n] not in (None, NEGATIVE) for n in names), (group, read)


@pytest.mark.parametrize("report, kind", [
    ("Right IJ catheter tip in the SVC.", "devices_line"),
    ("Left PICC line terminates in the SVC.", "devices_line"),
    ("ET tube 4 cm above the carina.", "devices_tube"),
    ("Nasogastric tube courses below the diaphragm.", "devices_tube"),
    ("Dual-chamber pacer with leads in the right ventricle.", "devices_pacemaker"),
    ("AICD in place.", "devices_pacemaker"),
    ("Median sternotomy wires.", "devices_other"),
    ("Right chest tube in place.", "devices_other"),
])
def test_device_kind_is_a_view_on_the_device_mention(report, kind):
    assert _positives(report) == {kind}


def test_a_device_of_no_known_kind_is_named_in_the_prompt():
    from pipeline.models.findings import findings_text

    assert findings_text(label_report("Median sternotomy wires.")) == \
        "Findings: support devices."


@pytest.mark.parametrize("report, hedged", [
    ("Possible small left pleural effusion. Endotracheal tube in place.", "effusion"),
    ("Heart size is upper limits of normal. Endotracheal tube in place.", "cardiomegaly"),
    ("Pneumothorax is unlikely. Endotracheal tube in place.", "pneumothorax"),
])
def test_uncertain_policy_sets_the_heads_targets(report, hedged):
    import torch
    from pipeline.data import coarse_labels
    from pipeline.models.findings import COARSE, FINE, finding_mask, finding_targets

    names = (*FINE, *COARSE)
    ones, zeros, ignored = (finding_targets([report], p)[0] for p in
                            ("positive", "negative", "ignore"))
    mask = finding_mask([report], "ignore")[0]
    at = names.index(hedged)
    assert (ones[at], zeros[at], ignored[at], mask[at]) == (1, 0, 0, 0)
    tube = names.index("devices")  # a certain finding counts under every policy
    assert (ones[tube], zeros[tube], ignored[tube], mask[tube]) == (1, 1, 1, 1)
    assert int(mask.sum()) < len(names) and torch.equal(finding_mask([report])[0],
                                                        torch.ones(len(names)))
    assert coarse_labels(report, "negative")[hedged] == 0
    with pytest.raises(ValueError, match="uncertain"):
        finding_targets([report], "maybe")


def test_ignore_leaves_masked_targets_out_of_the_loss():
    import torch
    from pipeline.models.findings import HEAD_OUTPUTS, finding_loss, finding_mask

    reports = ["Possible small left pleural effusion.", "Right pneumothorax."]
    logits = torch.randn(2, HEAD_OUTPUTS, generator=torch.Generator().manual_seed(0))
    weight = torch.full((HEAD_OUTPUTS,), 2.0)
    mask = finding_mask(reports, "ignore")
    masked = finding_loss(logits, reports, weight, "ignore")
    moved = logits + 50 * (1 - mask)  # a masked logit may be anything
    assert torch.allclose(finding_loss(moved, reports, weight, "ignore"), masked)
    assert not torch.allclose(finding_loss(moved, reports, weight, "negative"),
                              finding_loss(logits, reports, weight, "negative"))


def test_uncertain_policy_is_a_data_parameter_logged_with_the_config():
    from pipeline import config as C

    assert C.flatten(C.Stage1Config())["data.uncertain"] == "positive"
    assert C.flatten(C.Stage2Config(data=C.DataConfig(uncertain="ignore")))[
        "data.uncertain"] == "ignore"
    with pytest.raises(C.ConfigError, match="uncertain"):
        C.DataConfig(uncertain="sometimes")


def test_uncertain_policy_is_a_stage1_and_stage2_parameter_logged_on_the_run(mlflow_store):
    import mlflow
    from click.testing import CliRunner

    from steps import stage1, stage2

    for step, args in ((stage1, []), (stage2, ["--init", "scratch"])):
        result = CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "1",
                                                "--uncertain", "ignore", *args])
        assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.params["data.uncertain"] for r in runs) == ["ignore", "ignore"]
    refused = CliRunner().invoke(stage1.main, ["--profile", "tiny", "--uncertain", "maybe"])
    assert refused.exit_code == 2 and "maybe" in refused.output


@pytest.mark.parametrize("report, expected", [
    ("There is a left retrocardiac opacity and mild right basilar atelectasis.",
     {"opacity_left", "atelectasis_right"}),
    ("Left lower lobe opacity with small right pleural effusion and right basilar atelectasis.",
     {"opacity_left", "effusion_right", "atelectasis_right"}),
    ("Right lower lobe opacity, likely pneumonia.", {"consolidation_right_lower"}),
    ("Left basilar opacity may represent atelectasis.", {"atelectasis_left"}),
])
def test_an_opacity_is_another_finding_only_where_the_clause_names_it_so(report, expected):
    """Two findings joined by "and" / "with" stay two; "likely", "may represent" name one."""
    from pipeline.data.labeler import label_report

    assert {k for k, v in label_report(report).items() if v} == expected
