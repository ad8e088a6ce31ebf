"""The writer under `FindingsConstraint`: what its prompt names is never denied, what it does
not name is never asserted, words stay whole, and the report model writes under it in
evaluation and serving alike."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.data.labeler import FINDINGS, UNLOCALISED, label_report
from pipeline.data.report_text import contradictions, sentences
from pipeline.models import report_model as R
from pipeline.models.faithful_decoding import FindingsConstraint, violations
from pipeline.models.tiny_lm import build_tiny_llm, build_tiny_tokenizer

MEMORISED = "There is a small left pleural effusion. The heart is enlarged. No pleural effusion."
VOCABULARY = {w for s in sentences(
    MEMORISED + " There is a small right pleural thickening. The heart is normal in size. No "
    "pneumothorax or pneumonia. The costophrenic angles are sharp. Mediastinal contours are "
    "normal.") for w in s.split()}


def labels(*named: str) -> dict[str, int]:
    out = dict.fromkeys((*FINDINGS[:-1], *UNLOCALISED), 0)
    out.update(dict.fromkeys(named, 1))
    out["no_finding"] = int(not named)
    return out


@pytest.fixture(scope="module")
def constraint():
    return lambda *named: FindingsConstraint(build_tiny_tokenizer(), [labels(*named)],
                                             vocabulary=VOCABULARY)


def test_violations_read_denials_of_named_findings_and_assertions_of_others():
    named = frozenset({"effusion_left", "cardiomegaly"})
    assert violations("No pleural effusion", named) == {"denies:effusion"}
    assert violations("The costophrenic angles are sharp", named) == {"denies:effusion"}
    assert violations("The heart is normal in size", named) == {"denies:cardiomegaly"}
    assert violations("There is a right pleural effusion", named) == {"asserts:effusion_right"}
    assert violations("No right pleural effusion", named) == set()  # the other side
    assert violations("No pneumothorax", named) == set()
    assert violations("There is a small left pleural effusion", named) == set()


def test_a_denial_of_a_named_finding_is_banned_where_its_word_starts(constraint):
    named_effusion = constraint("effusion_left")
    named = named_effusion.named[0]
    # "eff" can only become effusion(s): denying the named effusion, so it is banned there,
    # not after "effus" has left a broken word behind.
    assert not named_effusion.allowed("No pleural", " eff", named)
    assert named_effusion.allowed("No pleural", " thick", named)
    assert named_effusion.allowed("No", " pne", named)  # pneumothorax / pneumonia: fine
    without = constraint()
    assert without.allowed("No pleural", " eff", without.named[0])


def test_an_unnamed_finding_may_be_denied_but_not_asserted(constraint):
    named_effusion = constraint("effusion_left")
    named = named_effusion.named[0]
    assert not named_effusion.allowed("There is a small right pleural", " effusion", named)
    assert not named_effusion.allowed("The heart is", " enlarged", named)
    assert named_effusion.allowed("The heart is", " normal", named)
    assert named_effusion.allowed("There is a small left pleural", " effusion", named)


def test_only_what_the_token_changes_counts(constraint):
    named_effusion = constraint("effusion_left")
    named = named_effusion.named[0]
    # The sentence already asserts an unnamed finding: later words are not all banned for it.
    assert named_effusion.allowed("The heart is enlarged", ".", named)
    # A new sentence starts clean.
    assert named_effusion.allowed("The heart is enlarged.", " The", named)


def test_coined_words_markup_and_mixed_case_are_not_written(constraint):
    c = constraint("effusion_left")
    named = c.named[0]
    assert not c.allowed("No acute cardi", "ome", named) or "cardiome" in "".join(VOCABULARY)
    assert not c.allowed("The heart is norm", "x", named)  # no training word starts "normx"
    assert not c.allowed("The heart is norm", ".", named)  # "norm" ends unfinished
    assert not c.allowed("The heart is normal.", "\n", named)
    assert not c.allowed("The heart is normal.", " |", named)
    assert not c.allowed("The heart is norM", "al", named)
    assert c.allowed("The heart is norm", "al", named)


def test_a_dead_end_word_is_finished_as_an_allowed_word():
    tokenizer = build_tiny_tokenizer()
    c = FindingsConstraint(tokenizer, [labels("effusion_left")],
                           vocabulary=VOCABULARY | {"effaced"})
    # Every ranked token is banned (depth 1), so the way out finishes "eff" as "effaced".
    out = c._rescue("No pleural eff", c.named[0])
    pieces = [tokenizer.decode([t]) for t in out]
    assert pieces and all("effaced".startswith("eff" + p) for p in pieces), pieces


def _memorising_llm(steps: int = 200):
    """A tiny LM that writes MEMORISED after any prompt: it asserts an enlarged heart and
    denies the effusion it also asserts."""
    llm = build_tiny_llm(vocab_texts=[MEMORISED])
    ids = llm.tokenizer(MEMORISED, add_special_tokens=False)["input_ids"] + [llm.eos_token_id]
    model = llm.model
    for p in model.parameters():
        p.requires_grad_(True)  # a test fixture training its own LM, not pipeline code
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    row = torch.tensor([ids])
    prefix = torch.randn((1, 2, model.config.hidden_size), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        embeds = torch.cat([prefix, model.get_input_embeddings()(row)], 1)
        loss = model(inputs_embeds=embeds,
                     labels=torch.cat([torch.full((1, 2), -100), row], 1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return llm, prefix


def test_a_memorised_contradiction_is_not_written_under_the_constraint():
    llm, prefix = _memorising_llm()
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    free = llm.generate(prefix, mask, max_new_tokens=40)[0]
    assert contradictions(free) == ["effusion"], free  # the LM alone contradicts itself
    given = labels("effusion_left")
    c = FindingsConstraint(llm.tokenizer, [given], vocabulary=VOCABULARY, eos=llm.eos_token_id)
    written = llm.generate(prefix, mask, max_new_tokens=40, logits_processor=[c])[0]
    assert c.banned > 0
    assert contradictions(written) == [], written
    stated = {k for k, v in label_report(written).items() if v and k != "no_finding"}
    assert stated <= {"effusion_left"}, written  # no enlarged heart the prompt did not name
    words = {w for s in sentences(written) for w in s.split()}
    assert words <= VOCABULARY, written


def _tiny_report_parts():
    """The tiny profile's Stage 2 config, a tiny random LM, and an untrained vision-bridge."""
    from pipeline import config as C
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage2Config, "tiny")
    llm = build_tiny_llm()
    return cfg, llm, VisionBridge.from_config(cfg.encoder, cfg.bridge,
                                              out_dim=llm.hidden_size).eval()


def test_the_report_model_writes_under_the_constraint_its_config_asks_for(monkeypatch):
    cfg, llm, model = _tiny_report_parts()
    seen = []
    real = llm.generate

    def generate(*args, **kwargs):
        seen.append(kwargs.get("logits_processor"))
        return real(*args, **kwargs)
    monkeypatch.setattr(llm, "generate", generate)
    images = torch.rand(2, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    for flag in (False, True):
        report_model = R.ReportModel(model, llm, replace(cfg, constrain_findings=flag))
        report_model.generate(images, max_new_tokens=4)
    off, on = seen
    if not R.uses_findings(cfg, model):
        pytest.skip("the tiny profile's model writes without findings")
    assert off is None
    assert isinstance(on[0], FindingsConstraint) and len(on[0].named) == 2


def test_beams_and_samples_are_written_under_the_constraint_too(monkeypatch):
    cfg, llm, model = _tiny_report_parts()
    made = []
    real = FindingsConstraint.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(FindingsConstraint, "__init__", init)
    report_model = R.ReportModel(model, llm, replace(cfg, constrain_findings=True,
                                                     choose_samples=2))
    images = torch.rand(2, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    candidates, given = report_model.candidates(images, num_beams=2, max_new_tokens=6)
    assert [len(row) for row in candidates] == [4, 4]  # 2 beams + 2 samples each
    beams, *samples = made
    assert (beams.rows_per_prompt, beams.width, beams.sampling) == (2, 4, False)
    assert len(samples) == 2 and all(s.sampling and s.rows_per_prompt == 2 for s in samples)
    assert [s.named for s in samples] == [[beams.named[0]], [beams.named[1]]]


def test_a_sampled_row_at_a_dead_end_keeps_only_the_way_out():
    """Sampling draws from the kept tokens alone: a row at a dead end keeps the tokens that
    finish its word as an allowed one, never an empty row (which torch.multinomial refuses)."""
    tokenizer = build_tiny_tokenizer()
    c = FindingsConstraint(tokenizer, [labels("effusion_left")], rows_per_prompt=1,
                           vocabulary=VOCABULARY | {"effaced"}, width=4, depth=1, sampling=True)
    input_ids = torch.tensor([tokenizer("No pleural eff", add_special_tokens=False)["input_ids"]])
    scores = torch.zeros(1, len(tokenizer))
    scores[0, tokenizer.convert_tokens_to_ids("x")] = 5.0  # the best token coins "effx"
    out = c(input_ids, scores)
    kept = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept and all("effaced".startswith("eff" + tokenizer.decode([t])) for t in kept)
    assert not torch.isnan(torch.softmax(out, dim=-1)).any()
