"""The CheXpert-14 rule labeler on sentences written as reports are: every observation positive,
negative and uncertain, the known rule-labeler traps, No Finding, and the CE scores."""
from __future__ import annotations

import math

import pytest

from pipeline.data.chexpert import OBSERVATIONS, binary, label_chexpert
from pipeline.evaluate.clinical import chexpert_labels, chexpert_scores

P, N, U = 1, 0, -1

# (observation, sentence, expected status)
CASES = [
    ("Enlarged Cardiomediastinum", "The mediastinum is widened.", P),
    ("Enlarged Cardiomediastinum", "Widened mediastinum, concerning for vascular injury.", P),
    ("Enlarged Cardiomediastinum", "The cardiomediastinal silhouette is within normal limits.", N),
    ("Enlarged Cardiomediastinum", "Mediastinal contours are normal.", N),
    ("Enlarged Cardiomediastinum", "The mediastinum may be mildly widened.", U),
    ("Cardiomegaly", "Mild cardiomegaly.", P),
    ("Cardiomegaly", "The heart is moderately enlarged.", P),
    ("Cardiomegaly", "Heart size within normal limits.", N),
    ("Cardiomegaly", "Normal heart size.", N),
    ("Cardiomegaly", "The heart is not enlarged.", N),
    ("Cardiomegaly", "Heart size is at the upper limits of normal.", U),
    ("Cardiomegaly", "Borderline cardiomegaly.", U),
    ("Cardiomegaly", "Possible cardiomegaly.", U),
    ("Lung Opacity", "Patchy opacity in the right lower lobe.", P),
    ("Lung Opacity", "Bibasilar airspace disease.", P),
    ("Lung Opacity", "Increased interstitial markings.", P),
    ("Lung Opacity", "No focal airspace opacity.", N),
    ("Lung Opacity", "Questionable left basilar opacity.", U),
    ("Lung Lesion", "Calcified granuloma in the right upper lobe.", P),
    ("Lung Lesion", "A 2 cm nodule in the left upper lobe.", P),
    ("Lung Lesion", "No suspicious pulmonary nodules or masses.", N),
    ("Lung Lesion", "Rounded density may represent a nodule.", U),
    ("Edema", "Mild pulmonary edema.", P),
    ("Edema", "Pulmonary vascular congestion.", P),
    ("Edema", "No pulmonary edema.", N),
    ("Edema", "Findings may reflect mild interstitial edema.", U),
    ("Consolidation", "Dense consolidation of the left lower lobe.", P),
    ("Consolidation", "The lungs are free of consolidation.", N),
    ("Consolidation", "Consolidation cannot be excluded.", U),
    ("Pneumonia", "Right lower lobe pneumonia.", P),
    ("Pneumonia", "No evidence of pneumonia.", N),
    ("Pneumonia", "Opacity may represent pneumonia.", U),
    ("Pneumonia", "Cannot exclude early pneumonia.", U),
    ("Atelectasis", "Bibasilar atelectasis.", P),
    ("Atelectasis", "No atelectasis.", N),
    ("Atelectasis", "Likely atelectasis at the left base.", U),
    ("Pneumothorax", "Small right apical pneumothorax.", P),
    ("Pneumothorax", "No pneumothorax.", N),
    ("Pneumothorax", "Possible tiny left pneumothorax.", U),
    ("Pleural Effusion", "Small bilateral pleural effusions.", P),
    ("Pleural Effusion", "Blunting of the left costophrenic angle.", P),
    ("Pleural Effusion", "No pleural effusion.", N),
    ("Pleural Effusion", "The costophrenic angles are sharp.", N),
    ("Pleural Effusion", "Interval resolution of the right pleural effusion.", N),
    ("Pleural Effusion", "Trace left pleural effusion is not excluded.", U),
    ("Pleural Other", "Right pleural thickening.", P),
    ("Pleural Other", "Calcified pleural plaques.", P),
    ("Pleural Other", "No pleural thickening.", N),
    ("Pleural Other", "Possible apical pleural thickening.", U),
    ("Fracture", "Healed left rib fractures.", P),
    ("Fracture", "No displaced rib fracture.", N),
    ("Fracture", "Questionable fracture of the right seventh rib.", U),
    ("Support Devices", "Endotracheal tube terminates 4 cm above the carina.", P),
    ("Support Devices", "Left-sided pacemaker with leads in the right atrium.", P),
    ("Support Devices", "Right PICC line tip in the SVC.", P),
    ("Support Devices", "Median sternotomy wires.", P),
    ("Support Devices", "The endotracheal tube has been removed.", N),
    ("Support Devices", "Possible nasogastric tube in the stomach.", U),
]


@pytest.mark.parametrize("observation,sentence,expected", CASES,
                         ids=[f"{o}:{s}" for o, s, _ in CASES])
def test_observation_status(observation, sentence, expected):
    assert label_chexpert(sentence)[observation] == expected


def test_every_observation_has_positive_negative_and_uncertain_examples():
    for observation in OBSERVATIONS[1:]:
        assert {e for o, _, e in CASES if o == observation} == {P, N, U}, observation


# ---------------------------------------------------------------------------- traps
def test_normal_heart_size_is_not_cardiomegaly():
    labels = label_chexpert("Heart size within normal limits. The heart size and pulmonary "
                            "vascularity appear within normal limits.")
    assert labels["Cardiomegaly"] == N and labels["Enlarged Cardiomediastinum"] is None


def test_b_lines_are_not_support_devices_but_lines_and_wires_are():
    assert label_chexpert("Kerley B-lines at the bases.")["Support Devices"] is None
    assert label_chexpert("Kerley B-lines at the bases.")["Edema"] == P
    for device in ("Right IJ central line ends in the SVC.", "Sternotomy wires are intact.",
                   "Swan-Ganz catheter in the right pulmonary artery.",
                   "Dual-chamber pacemaker in place."):
        assert label_chexpert(device)["Support Devices"] == P, device


def test_a_negation_covers_every_finding_of_its_list():
    labels = label_chexpert("No edema or pneumonia.")
    assert labels["Edema"] == N and labels["Pneumonia"] == N
    labels = label_chexpert("No large pleural effusion, pneumothorax, or focal airspace "
                            "consolidation.")
    assert labels["Pleural Effusion"] == labels["Pneumothorax"] == labels["Consolidation"] == N


def test_granuloma_is_a_lung_lesion():
    assert label_chexpert("Calcified granuloma.")["Lung Lesion"] == P
    assert label_chexpert("Granulomas in the left lung.")["Lung Lesion"] == P


def test_airspace_disease_is_opacity_not_consolidation():
    labels = label_chexpert("Right basilar airspace disease.")
    assert labels["Lung Opacity"] == P and labels["Consolidation"] is None
    assert label_chexpert("Opacity with consolidation.")["Consolidation"] == P


@pytest.mark.parametrize("sentence", [
    "Opacity may represent pneumonia.", "Cannot exclude pneumonia.",
    "Atelectasis versus pneumonia.", "Likely pneumonia.", "Possible pneumonia.",
    "Findings could be due to pneumonia.", "Pneumonia is not excluded.",
    "Suspicious for pneumonia."])
def test_uncertainty_phrases(sentence):
    assert label_chexpert(sentence)["Pneumonia"] == U


@pytest.mark.parametrize("sentence", [
    "No pneumonia.", "Without pneumonia.", "Lungs are free of pneumonia.",
    "The pneumonia has resolved.", "Resolved pneumonia.", "Negative for pneumonia.",
    "No focal opacity to suggest pneumonia."])
def test_negation_phrases(sentence):
    assert label_chexpert(sentence)["Pneumonia"] == N


def test_versus_makes_both_sides_uncertain_and_a_clause_break_ends_a_scope():
    labels = label_chexpert("Bibasilar atelectasis versus consolidation.")
    assert labels["Atelectasis"] == labels["Consolidation"] == U
    labels = label_chexpert("No pneumothorax, but there is a small left effusion.")
    assert labels["Pneumothorax"] == N and labels["Pleural Effusion"] == P


def test_no_change_is_not_a_negation():
    assert label_chexpert("No change in the moderate right effusion.")["Pleural Effusion"] == P


# ---------------------------------------------------------------------------- No Finding
def test_no_finding_only_when_nothing_but_devices_is_positive_or_uncertain():
    assert label_chexpert("No acute cardiopulmonary abnormality.")["No Finding"] == P
    assert label_chexpert("Pacemaker in place. Lungs are clear.")["No Finding"] == P
    assert label_chexpert("Possible small effusion.")["No Finding"] is None
    assert label_chexpert("Healed rib fracture.")["No Finding"] is None
    assert label_chexpert("No pneumothorax or effusion.")["No Finding"] == P


def test_binary_counts_uncertain_as_positive_unless_asked():
    labels = label_chexpert("Possible small effusion. No pneumothorax.")
    assert binary(labels)["Pleural Effusion"] == 1 and binary(labels)["Pneumothorax"] == 0
    assert binary(labels, uncertain=0)["Pleural Effusion"] == 0


# ---------------------------------------------------------------------------- CE scores
def test_chexpert_scores_micro_macro_and_unscored_observations():
    references = chexpert_labels(["Cardiomegaly. Small left effusion.", "No acute disease."])
    perfect = chexpert_scores(references, references)
    assert perfect["chexpert_micro_f1"] == perfect["chexpert_macro_f1"] == 1.0
    assert perfect["chexpert_n_scored"] == 3  # cardiomegaly, effusion, no finding
    assert math.isnan(perfect["chexpert_f1/pneumonia"])
    constant = chexpert_scores(references, chexpert_labels(["No acute disease."] * 2))
    assert constant["chexpert_f1/no_finding"] == pytest.approx(2 / 3)
    assert constant["chexpert_micro_recall"] == pytest.approx(1 / 3)
    assert constant["chexpert_micro_precision"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------- real-report wording
# Misreadings found on real reports, each pinned in the wording real reports use.
@pytest.mark.parametrize("observation,sentence", [
    ("Pleural Effusion", "The effusion is no longer seen."),
    ("Pleural Effusion", "The right pleural effusion is no longer visible."),
    ("Pleural Effusion", "The effusion is no longer present."),
    ("Pleural Effusion", "Previously seen left effusion is no longer identified."),
    ("Pleural Effusion", "Left pleural effusion has resolved."),
    ("Pneumothorax", "The small right apical pneumothorax has resolved."),
    ("Support Devices", "The ET tube is no longer seen."),
])
def test_resolved_and_no_longer_seen_are_negative(observation, sentence):
    assert label_chexpert(sentence)[observation] == N


def test_no_longer_seen_does_not_negate_the_next_finding():
    labels = label_chexpert("The effusion is no longer seen. Small right pneumothorax.")
    assert labels["Pleural Effusion"] == N and labels["Pneumothorax"] == P


@pytest.mark.parametrize("observation,sentence", [
    ("Pneumothorax", "The pneumothorax is unlikely."),
    ("Pneumonia", "Pneumonia is felt to be unlikely."),
    ("Pneumonia", "Pneumonia is considered unlikely."),
    ("Pneumonia", "Unlikely to represent pneumonia."),
    ("Pneumonia", "Pneumonia is thought less likely."),
    ("Pneumonia", "Atelectasis is favored; pneumonia is less likely."),
    ("Pneumonia", "Less likely pneumonia."),
    ("Pneumonia", "Early pneumonia is not excluded."),
    ("Pleural Effusion", "A small left effusion is not excluded."),
])
def test_unlikely_less_likely_and_not_excluded_are_uncertain(observation, sentence):
    # CheXpert reads "unlikely" as uncertain, not as a negation.
    assert label_chexpert(sentence)[observation] == U


def test_unlikely_does_not_cross_a_clause():
    labels = label_chexpert("Pneumonia is unlikely but atelectasis is present.")
    assert labels["Pneumonia"] == U and labels["Atelectasis"] == P


@pytest.mark.parametrize("sentence", [
    "Heart size is borderline.", "Borderline heart size.", "Heart is borderline in size.",
    "The cardiac silhouette is borderline enlarged.", "Heart size upper limits of normal.",
    "The heart is at the upper limits of normal in size.",
    "Cardiac silhouette is at the upper limits of normal.",
])
def test_borderline_and_upper_limits_of_normal_heart_size_are_uncertain(sentence):
    assert label_chexpert(sentence)["Cardiomegaly"] == U


@pytest.mark.parametrize("sentence,expected", [
    ("Blunting of the left costophrenic angle.", P),
    ("Blunting of left costophrenic angle.", P),
    ("Blunted left costophrenic angle.", P),
    ("Mild blunting of the right costophrenic sulcus.", P),
    ("The left costophrenic angle is blunted.", P),
    ("Right costophrenic angle blunting.", P),
    ("Blunting of the right costophrenic angle may be due to pleural thickening.", P),
    ("No blunting of the costophrenic angles.", N),
    ("The costophrenic angles are sharp.", N),
])
def test_blunting_of_a_costophrenic_angle_is_an_effusion(sentence, expected):
    assert label_chexpert(sentence)["Pleural Effusion"] == expected


# Convention (docs/guide/data.md): a calcified granuloma is a Lung Lesion, positive, as
# CheXpert's observation list reads a granuloma; calcified lymph nodes are not a lung lesion.
@pytest.mark.parametrize("sentence,expected", [
    ("Calcified granulomas.", P),
    ("Scattered calcified granulomas in the left lung.", P),
    ("Stable right upper lobe calcified granuloma.", P),
    ("Calcified lymph XXXX and granuloma in the right hilum.", P),
    ("No calcified granuloma.", N),
    ("Calcified hilar lymph nodes.", None),
    ("Calcified mediastinal lymph XXXX.", None),
])
def test_calcified_granuloma_convention(sentence, expected):
    assert label_chexpert(sentence)["Lung Lesion"] == expected


def test_a_calcified_granuloma_is_not_no_finding():
    labels = label_chexpert("Calcified granuloma. No acute cardiopulmonary abnormality.")
    assert labels["Lung Lesion"] == P and labels["No Finding"] is None


# "XXXX" marks a word removed by de-identification (IU X-Ray); a mention or a normal phrase
# with one inside still reads.
@pytest.mark.parametrize("observation,sentence,expected", [
    ("Cardiomegaly", "Heart size XXXX within normal limits.", N),
    ("Cardiomegaly", "The heart size is XXXX normal.", N),
    ("Enlarged Cardiomediastinum", "Cardiac and mediastinal XXXX appear normal.", N),
    ("Enlarged Cardiomediastinum", "The mediastinal XXXX are within normal limits.", N),
    ("Pleural Effusion", "The costophrenic XXXX are blunted.", P),
    ("Pleural Effusion", "Left costophrenic XXXX blunting.", P),
    ("Pleural Effusion", "The costophrenic XXXX are sharp.", N),
    ("Pleural Effusion", "No pneumothorax or costophrenic XXXX blunting to suggest effusion.", N),
    ("Pneumothorax", "No XXXX pneumothorax.", N),
    ("Support Devices", "Sternotomy XXXX are intact.", P),
    ("Lung Opacity", "XXXX opacity in the left lower lobe.", P),
])
def test_deidentification_tokens_inside_a_mention(observation, sentence, expected):
    assert label_chexpert(sentence)[observation] == expected


@pytest.mark.parametrize("sentence", [
    "The nasogastric tube has been removed.", "Status post removal of the endotracheal tube.",
    "Interval removal of the right IJ central line.", "The feeding tube was removed.",
    "Feeding tube removed.", "The chest tube has since been removed."])
def test_removed_devices_are_negative(sentence):
    assert label_chexpert(sentence)["Support Devices"] == N


def test_a_removal_negates_devices_only():
    labels = label_chexpert("Interval removal of the right chest tube with right basilar "
                            "atelectasis.")
    assert labels["Support Devices"] == N and labels["Atelectasis"] == P


def test_ce_in_paper_conventions_named_with_the_rule_labeler():
    references = chexpert_labels(["Cardiomegaly. Small left effusion.", "No acute disease."])
    hypotheses = chexpert_labels(["Cardiomegaly.", "Small right pneumothorax."])
    scores = chexpert_scores(references, hypotheses)
    # tp: cardiomegaly; fn: effusion, no finding; fp: pneumothorax.
    assert scores["ce_rule_micro14_precision"] == pytest.approx(1 / 2)
    assert scores["ce_rule_micro14_recall"] == pytest.approx(1 / 3)
    assert scores["ce_rule_micro14_f1"] == pytest.approx(0.4) == scores["chexpert_micro_f1"]
    # The five: cardiomegaly found, the effusion missed.
    assert scores["ce_rule_micro5_precision"] == pytest.approx(1.0)
    assert scores["ce_rule_micro5_recall"] == pytest.approx(1 / 2)
    assert scores["ce_rule_micro5_f1"] == pytest.approx(2 / 3)
    # Macro over all 14, an observation on neither side counting 0 (sklearn's macro).
    for key in ("precision", "recall", "f1"):
        assert scores[f"ce_rule_macro14_{key}"] == pytest.approx(1 / 14)
    assert scores["chexpert_macro_f1"] == pytest.approx(1 / 4)  # the project's: scored ones
    # Example-based: report 1 P 1, R 1/2, F1 2/3; report 2 all 0.
    assert scores["ce_rule_example14_precision"] == pytest.approx(1 / 2)
    assert scores["ce_rule_example14_recall"] == pytest.approx(1 / 4)
    assert scores["ce_rule_example14_f1"] == pytest.approx(1 / 3)
    perfect = chexpert_scores(references, references)
    assert all(perfect[f"ce_rule_{avg}_f1"] == 1.0 for avg in ("micro14", "micro5", "example14"))
    assert perfect["ce_rule_macro14_f1"] == pytest.approx(3 / 14)


def test_the_blind_baseline_logs_every_paper_convention():
    from pipeline.evaluate.evaluation import BLIND_CE_KEYS

    labels = chexpert_labels(["Cardiomegaly."])
    scores = chexpert_scores(labels, labels)
    assert set(BLIND_CE_KEYS) <= set(scores)
    assert {f"ce_rule_{a}_{k}" for a in ("micro14", "macro14", "micro5", "example14")
            for k in ("precision", "recall", "f1")} <= set(BLIND_CE_KEYS)


def test_a_trigger_after_a_statement_with_its_own_verb_belongs_to_the_next_subject():
    labels = label_chexpert("The heart is enlarged and the pneumothorax is not seen.")
    assert (labels["Cardiomegaly"], labels["Pneumothorax"]) == (1, 0)
    assert label_chexpert("The effusion and pneumothorax have resolved.")["Pleural Effusion"] == 0
