"""Report form, chat preambles, foreign words and self-contradiction against training reports."""
from __future__ import annotations

import pytest

from pipeline.data.report_text import (ReportStyle, contradictions, findings_first,
                                       findings_first_parts,
                                       has_preamble, language_scores, read_report,
                                       resolve_contradictions, rouge_l)
from pipeline.models.report_model import choose_reports

TRAIN = ["The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
         "The heart is enlarged. There is a small left pleural effusion. No pneumothorax.",
         "Heart size is within normal limits. There is a nodule in the right upper zone."]


@pytest.fixture(scope="module")
def style():
    return ReportStyle.from_reports(TRAIN)


def test_training_sentences_are_in_form_and_assistant_text_is_not(style):
    assert language_scores(TRAIN, style)["report_form"] == 1.0
    chat = ("The patient is a 28-year-old male with a history of asthma. "
            "Right lung volume of 2200 mL.")
    reading = read_report(chat, style)
    assert reading.in_form == 0 and reading.sentences == 2
    assert reading.foreign >= 8  # age, history, volume: words no training report has
    # A paraphrase close to a training sentence counts; case and punctuation never matter.
    assert style.form("THE HEART IS NORMAL IN SIZE!") == (1, 1)
    assert style.closeness("the heart is mildly enlarged".split()) >= 0.6


@pytest.mark.parametrize("text", [
    "Sure, here is the report: the heart is enlarged.",
    "The chest X-ray report for this chest X-radiology report is: the lungs are clear.",
    "The lungs are clear. You are a helpful AI assistant named SmolLM, trained by Hugging Face",
])
def test_chat_preambles_are_caught(text):
    assert has_preamble(text)


@pytest.mark.parametrize("text", TRAIN + ["Report of the heart: normal."])
def test_report_text_is_no_preamble(text):
    assert not has_preamble(text)


@pytest.mark.parametrize("text, groups", [
    ("Cardiomegaly is present. The heart is normal in size.", ["cardiomegaly"]),
    ("The cardiomegaly is likely to be focal. The heart is normal in size.", ["cardiomegaly"]),
    ("The heart is enlarged. The heart is not enlarged.", ["cardiomegaly"]),
    ("There is a small left pleural effusion. No pleural effusion.", ["effusion"]),
    ("There is a small left pleural effusion. No left pleural effusion.", ["effusion"]),
    ("Focal consolidation in the right lower zone. The lungs are clear.", ["consolidation"]),
    # Not contradictions: another side, another finding, a denial alone.
    ("There is a small left pleural effusion. No right pleural effusion.", []),
    ("The heart is enlarged. No pleural effusion or pneumothorax.", []),
    ("The heart is normal in size. No cardiomegaly.", []),
])
def test_self_contradiction(text, groups):
    assert contradictions(text) == groups


def test_the_synthetic_references_read_as_reports():
    from pipeline import config as C
    from pipeline.data import load_dataset

    data = load_dataset(C.build(C.Stage2Config, "tiny").data)
    style = ReportStyle.from_reports(r.report for r in data["train"])
    scores = language_scores([r.report for r in data["train"]], style)
    assert scores["report_form"] == 1.0
    assert scores["contradiction_share"] == scores["preamble_share"] == 0.0


def test_style_round_trips_through_its_sentences(style):
    again = ReportStyle.from_sentences(style.to_sentences())
    assert again.sentences == style.sentences and again.vocabulary == style.vocabulary


def test_rouge_l_matches_its_definition():
    assert rouge_l("a b c d".split(), "a b c d".split()) == pytest.approx(1.0)
    assert rouge_l("a b".split(), "c d".split()) == 0.0
    p, r, beta = 2 / 3, 2 / 4, 1.2  # LCS "a c" of "a x c" and "a b c d"
    assert rouge_l("a x c".split(), "a b c d".split()) == \
        pytest.approx((1 + beta ** 2) * p * r / (r + beta ** 2 * p))


def test_choice_prefers_a_report_that_does_not_contradict_itself_then_form(style):
    given = {"cardiomegaly": 1}
    contradicting = "Cardiomegaly is present. The heart is normal in size."
    foreign = "The heart is enlarged. The patient is a 28-year-old male."
    clean = "The heart is enlarged. No pneumothorax."
    beams = [contradicting, foreign, clean]
    assert choose_reports([beams], [given], style=style) == [clean]
    assert choose_reports([beams[:2]], [given], style=style) == [foreign]
    assert choose_reports([beams], None, by_findings=False, style=style) == [contradicting]


def test_generation_is_bounded_by_the_longest_training_report():
    from pipeline.models.report_model import report_token_limit
    from pipeline.models.tiny_lm import build_tiny_llm

    tokenizer = build_tiny_llm().tokenizer
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in TRAIN)
    limit = report_token_limit(tokenizer, TRAIN)
    assert longest < limit <= int(longest * 1.1) + 2


def test_contradicting_sentences_are_dropped_by_the_findings_given():
    from pipeline.data.report_text import resolve_contradictions

    report = ("No focal consolidation. The heart is normal in size. Right middle zone nodule. "
              "Right lower zone consolidation, likely pneumonia.")
    # The findings say consolidation: its denial goes, every other sentence stays as written.
    fixed = resolve_contradictions(report, {"consolidation", "nodule"})
    assert fixed == ("The heart is normal in size. Right middle zone nodule. "
                     "Right lower zone consolidation, likely pneumonia.")
    assert contradictions(fixed) == []
    # The findings say no consolidation: the assertion goes instead.
    assert resolve_contradictions(report, {"nodule"}) == \
        "No focal consolidation. The heart is normal in size. Right middle zone nodule."
    # No findings known: a finding is never dropped, its denial is.
    assert "pneumonia" in resolve_contradictions(report)
    clean = "The heart is enlarged. No pneumothorax."
    assert resolve_contradictions(clean, set()) == clean


def test_sharp_costophrenic_angles_deny_an_effusion_and_the_denial_is_dropped():
    report = ("The mediastinum is unremarkable. The costophrenic angles are sharp. "
              "Cardiomegaly. Right pleural effusion.")
    assert contradictions(report) == ["effusion"]
    assert resolve_contradictions(report, {"effusion", "cardiomegaly"}) == (
        "The mediastinum is unremarkable. Cardiomegaly. Right pleural effusion.")
    assert contradictions("The costophrenic angles are sharp. No pneumothorax.") == []


def test_report_form_does_not_depend_on_string_hashing():
    """The sentences scored in full are chosen deterministically: the same text scores the same
    in every process (PYTHONHASHSEED changes set and Counter orders)."""
    import os
    import subprocess
    import sys
    script = (
        "import numpy as np\n"
        "from pipeline.data.report_text import ReportStyle\n"
        "from pipeline.data.synthetic import sample_study, write_report\n"
        "def reps(seed, n):\n"
        "    out = []\n"
        "    for i in range(n):\n"
        "        rng = np.random.default_rng([seed, i])\n"
        "        out.append(write_report(sample_study(rng, 2), rng, 2))\n"
        "    return out\n"
        "style = ReportStyle.from_reports(reps(0, 150))\n"
        "words = [w for r in reps(1, 40) for w in r.lower().replace('.', ' ').split()]\n"
        "probes = [words[i:i + n] for n in (3, 5, 8) for i in range(0, len(words) - n, 7)]\n"
        "print(repr([round(style.closeness(p), 6) for p in probes]))\n")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}
                              ).stdout for seed in (1, 2, 3, 4)}
    assert len(outputs) == 1


def test_findings_first_states_each_finding_first_in_the_prompts_order_and_keeps_every_sentence():
    report = ("The lungs are clear. An endotracheal tube is in place. No pneumothorax. "
              "Old fracture of a left lateral rib. The cardiac silhouette is enlarged. "
              "Cardiomegaly. Left rib fracture.")
    ordered = findings_first(report)
    # devices, cardiomegaly, fracture: the order of STATED_ORDER (the prompt's: tubes and
    # lines first); the rest, the closing impression included, keep their order after them.
    assert ordered == ("An endotracheal tube is in place. The cardiac silhouette is enlarged. "
                       "Old fracture of a left lateral rib. The lungs are clear. No pneumothorax. "
                       "Cardiomegaly. Left rib fracture.")
    assert sorted(ordered.split(". ")) == sorted(report.split(". "))
    normal = "The heart is normal in size. The lungs are clear. No pleural effusion."
    assert findings_first(normal) == normal


def test_the_prompt_names_tubes_and_lines_first_as_findings_first_states_them():
    from pipeline.models.findings import findings_text

    labels = {"effusion_left": 1, "atelectasis_left": 1, "devices_pacemaker": 1,
              "devices_tube": 1}
    assert findings_text(labels) == ("Findings: endotracheal tube; pacemaker; left pleural "
                                     "effusion; left basilar atelectasis.")
    report = ("Left pleural effusion. The heart is normal in size. Left basilar atelectasis. "
              "A dual-lead pacemaker projects over the left chest.")
    assert findings_first_parts(report)[0] == [
        "A dual-lead pacemaker projects over the left chest.", "Left pleural effusion.",
        "Left basilar atelectasis."]


def test_findings_first_changes_what_stage2_trains_on_only_when_asked(monkeypatch):
    import torch

    from pipeline import config as C
    from pipeline.models import captioning
    from pipeline.models.report_model import caption_forward

    class Tokenized(Exception):
        pass

    seen = []

    def tokenize(tokenizer, prompts, reports, *args):  # records what would be trained on
        seen.append(reports)
        raise Tokenized

    class LLM:
        tokenizer, eos_token_id, pad_token_id = None, 0, 0

    monkeypatch.setattr(captioning, "tokenize_batch", tokenize)
    report = "The lungs are clear. Right pneumothorax."
    for flag in (False, True):
        cfg = C.build(C.Stage2Config, "tiny", {"findings": False, "findings_first": flag})
        with pytest.raises(Tokenized):
            caption_forward(lambda images: images, LLM(), torch.zeros(1, 2, 3), [report], cfg)
    assert seen == [[report], ["Right pneumothorax. The lungs are clear."]]


def test_findings_weight_weighs_the_stated_findings_in_training_only():
    import torch

    from pipeline import config as C
    from pipeline.data.report_text import findings_first, findings_first_parts
    from pipeline.models import captioning
    from pipeline.models.report_model import caption_forward
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.models.vision_bridge import VisionBridge

    reports = ["The lungs are clear. Right pneumothorax. Cardiomegaly.",
               "No acute cardiopulmonary abnormality."]
    first, rest = findings_first_parts(reports[0])
    assert first == ["Cardiomegaly.", "Right pneumothorax."] and rest == ["The lungs are clear."]
    assert " ".join(first + rest) == findings_first(reports[0])
    assert findings_first_parts(reports[1]) == ([], [reports[1]])

    llm = build_tiny_llm()
    cfg = C.build(C.Stage2Config, "tiny", {"findings_weight": 3.0})
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, llm.hidden_size)
    images = torch.randn(2, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    plain = caption_forward(model, llm, images, reports, cfg)
    trained = caption_forward(model, llm, images, reports, cfg, training=True)
    assert plain.objective is None  # validation and the grounding gap: the plain mean
    assert torch.allclose(trained.loss, plain.loss, atol=1e-5)  # logged: the plain mean
    tokens = int((trained.labels[:, 1:] != -100).sum())
    stated = len(llm.tokenizer(" " + " ".join(first), add_special_tokens=False)["input_ids"])
    assert trained.weight == pytest.approx(tokens + 2 * stated)  # only the first report's
    # The objective by hand: each supervised token's CE, the stated findings' three times.
    logits = llm(inputs_embeds=captioning.assemble(trained.visual, trained.layout, llm.embed)[0],
                 attention_mask=captioning.assemble(trained.visual, trained.layout,
                                                    llm.embed)[1]).logits
    weights = captioning.token_weights(trained.layout, [stated, 0], 3.0)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                           trained.labels[:, 1:].flatten(), reduction="none",
                                           ignore_index=-100).view(2, -1)
    expected = (ce * weights[:, 1:]).sum() / weights[:, 1:].sum()
    assert torch.allclose(trained.objective, expected, atol=1e-5)
    assert not torch.allclose(trained.objective, trained.loss)
    # Weight 1 trains on the plain mean, as before the option.
    same = caption_forward(model, llm, images, reports,
                           C.build(C.Stage2Config, "tiny", {"findings_weight": 1.0}),
                           training=True)
    assert same.objective is None


def test_the_repair_never_drops_a_sentence_that_asserts_a_present_finding():
    report = "Cardiomegaly without pleural effusion. Small right pleural effusion."
    assert contradictions(report) == ["effusion"]
    # The denial is cut off its sentence; the cardiomegaly it also asserts stays.
    fixed = resolve_contradictions(report, {"cardiomegaly", "effusion"})
    assert fixed == "Cardiomegaly. Small right pleural effusion."
    assert contradictions(fixed) == []
    # A denial that opens the sentence cannot be cut off: the sentence stays whole.
    leading = "No pleural effusion, with cardiomegaly. Small right pleural effusion."
    assert resolve_contradictions(leading, {"cardiomegaly", "effusion"}) == leading
    # The effusion is not among the findings: its assertion goes, the sentence that asserts
    # the cardiomegaly stays as written.
    assert resolve_contradictions(report, {"cardiomegaly"}) == \
        "Cardiomegaly without pleural effusion."
    # Nothing present in the offending sentence: it still goes whole.
    assert resolve_contradictions("No pleural effusion. Small right pleural effusion.",
                                  {"effusion"}) == "Small right pleural effusion."
