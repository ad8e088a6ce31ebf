"""Does a text read as a radiology report? Report form, chat preambles, self-contradiction.

BLEU and CIDEr say how much a report shares with its own reference; they do not say whether
the rest of it is report language. A report generator that wraps the right findings in an
assistant's preamble, an invented history or a list of headings writes text that no training
report contains. Measured here, against the training reports (the references' style):

- **report form**: the share of generated sentences that have a training-report sentence
  within ROUGE-L 0.6 (LCS F-measure, beta 1.2 as pycocoevalcap's ROUGE-L). The references of
  the synthetic benchmark score 1.0; an assistant-style answer far less. Sentences are those
  of R2Gen's cleaning (`scoring.clean_report`), so punctuation and case do not count.
- **foreign words**: the share of generated words absent from every training report
  (invented terms, measurements, ages).
- **chat preamble**: a report that opens as an assistant's answer ("Sure, here is ...", "The
  chest X-ray report for ... is:") or names the assistant.
- **self-contradiction**: a report that asserts a finding group in one sentence and denies it
  in another, as the labeler reads each sentence alone: "Cardiomegaly is present. The heart
  is normal in size." Denials are the labeler's negated mentions ("no pleural effusion", "the
  heart is not enlarged") and normal statements ("heart size is within normal limits", "the
  lungs are clear").
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from pipeline.data.labeler import (COARSE_FINDINGS, STATED_ORDER, coarse_group, coarse_labels,
                                   label_report)
from pipeline.data.report_cleaning import clean_report_mimic_cxr as clean_report

FORM_THRESHOLD = 0.6  # ROUGE-L to the closest training sentence for a sentence to be in form
_BETA = 1.2  # pycocoevalcap's ROUGE-L beta
_SHORTLIST = 12  # training sentences with the most shared words get an exact LCS

_PREAMBLE = re.compile(
    r"^\W*(?:sure|certainly|of course|here is|here's|here are|below is|as an ai|i am|i'm|"
    r"i can|you are|the (?:chest )?x-?ray(?:\w+)? report|this (?:chest )?x-?ray(?:\w+)? report|"
    r"(?:radiology )?report:)", re.IGNORECASE)
_ASSISTANT = re.compile(r"\b(?:assistant|smollm|hugging ?face|helpful ai|language model)\b",
                        re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|absent|resolved|"
                       r"no evidence of|nor)\b")
# Normal statements deny a group without naming it.
_NORMAL = {
    "cardiomegaly": re.compile(
        r"\b(?:heart|cardiac|cardiomediastinal)(?: silhouette| size| shadow| contours?)?"
        r"(?: is| are| appears| remains)?(?: normal| within normal limits| unremarkable)"
        r"|\bnormal (?:heart|cardiac|cardiomediastinal)(?: size| silhouette| contours?)?"),
    "consolidation": re.compile(r"\blungs? (?:are |is )?(?:\w+ )?(?:and )?clear\b"),
    # Sharp angles deny an effusion on either side ("The costophrenic angles are sharp." beside
    # "Right pleural effusion." contradicts itself).
    "effusion": re.compile(r"\bcostophrenic (?:angles?|sulc[iu]s?) (?:is |are )?(?:sharp|clear)"),
    "enlarged_cardiomediastinum": re.compile(
        r"\b(?:cardio)?mediastin(?:um|al)(?: silhouette| contours?)?(?: is| are| appears)?"
        r"(?: normal| within normal limits| unremarkable)|\bnormal (?:cardio)?mediastinal"),
}


def sentences(report: str) -> list[str]:
    """The report's sentences as R2Gen's cleaning leaves them (lower case, no punctuation)."""
    return [s.strip() for s in clean_report(report).split(" .") if s.strip()]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token sequences (beta 1.2, as pycocoevalcap)."""
    if not candidate or not reference:
        return 0.0
    lcs = _lcs(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return (1 + _BETA ** 2) * precision * recall / (recall + _BETA ** 2 * precision)


@dataclass(frozen=True)
class ReportStyle:
    """The training reports' sentences and words: what generated text is measured against."""

    sentences: tuple[tuple[str, ...], ...]
    vocabulary: frozenset

    @classmethod
    def from_reports(cls, reports: Iterable[str]) -> "ReportStyle":
        """The style of `reports`: their distinct cleaned sentences, most frequent first, and
        their words."""
        counts = Counter(tuple(s.split()) for r in reports for s in sentences(r))
        unique = [s for s, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
        if not unique:
            raise ValueError("a report style needs at least one non-empty training report")
        return cls(tuple(unique), frozenset(w for s in unique for w in s))

    @classmethod
    def from_sentences(cls, lines: Iterable[str]) -> "ReportStyle":
        """A style saved with `to_sentences` (one cleaned sentence per entry)."""
        return cls.from_reports(f"{line} ." for line in lines)

    def to_sentences(self) -> list[str]:
        """The distinct training sentences, cleaned (what `from_sentences` reads back)."""
        return [" ".join(s) for s in self.sentences]

    def __post_init__(self):
        index: dict[str, list[int]] = {}
        for i, sentence in enumerate(self.sentences):
            for word in set(sentence):
                index.setdefault(word, []).append(i)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_exact", frozenset(self.sentences))

    def closeness(self, tokens: Sequence[str]) -> float:
        """ROUGE-L of a sentence to its closest training sentence (1.0: one of them)."""
        tokens = tuple(tokens)
        if tokens in self._exact:
            return 1.0
        shared = Counter(i for word in set(tokens) for i in self._index.get(word, ()))
        # Ties broken by sentence order, not by Counter's insertion order (which follows set
        # iteration, so string hashing, and would make the score differ between processes).
        shortlist = heapq.nsmallest(_SHORTLIST, shared.items(), key=lambda kv: (-kv[1], kv[0]))
        return max((rouge_l(tokens, self.sentences[i]) for i, _ in shortlist), default=0.0)

    def form(self, report: str, threshold: float = FORM_THRESHOLD) -> tuple[int, int]:
        """(sentences within `threshold` of a training sentence, sentences) of one report."""
        parts = [s.split() for s in sentences(report)]
        return sum(self.closeness(p) >= threshold for p in parts), len(parts)

    def foreign_words(self, report: str) -> tuple[int, int]:
        """(words absent from every training report, words) of one report."""
        words = [w for s in sentences(report) for w in s.split()]
        return sum(w not in self.vocabulary for w in words), len(words)


def has_preamble(report: str) -> bool:
    """True when the report opens as a chat assistant's answer or names the assistant."""
    return bool(_PREAMBLE.match(report.strip()) or _ASSISTANT.search(report))


def _sided(labels: Mapping[str, int]) -> set[str]:
    """The fine labels with a side among `labels`' positives."""
    return {k for k, v in labels.items() if v and ("_left" in k or "_right" in k)}


def denied(sentence: str) -> tuple[set[str], set[str]]:
    """(groups, sided fine labels) a sentence denies: a negated mention, or a normal
    statement. A denial that names a side ("no right pleural effusion") denies that side."""
    groups = {group for group, pattern in _NORMAL.items() if pattern.search(sentence)}
    sided: set[str] = set()
    if _NEGATION.search(sentence):
        # Mentions the labeler reads as affirmed once the negation cues are gone.
        stripped = " ".join(_NEGATION.sub(" ", sentence).split())
        affirmed = coarse_labels(sentence)
        mentioned = {g for g, v in coarse_labels(stripped).items()
                     if v and not affirmed[g] and g != "no_finding"}
        located = _sided(label_report(stripped)) - _sided(label_report(sentence))
        sided |= {name for name in located if coarse_group(name) in mentioned}
        groups |= mentioned - {coarse_group(name) for name in sided}
    return groups, sided


def contradictions(report: str) -> list[str]:
    """Finding groups the report both asserts (in one sentence) and denies (in another); a
    side-specific denial contradicts only an assertion on that side."""
    asserted_groups: set[str] = set()
    asserted_sided: set[str] = set()
    denied_groups: set[str] = set()
    denied_sided: set[str] = set()
    for sentence in sentences(report):
        asserted_groups |= {g for g, v in coarse_labels(sentence).items()
                            if v and g != "no_finding"}
        asserted_sided |= _sided(label_report(sentence))
        groups, sided = denied(sentence)
        denied_groups |= groups
        denied_sided |= sided
    clash = (asserted_groups & denied_groups) | \
        {coarse_group(name) for name in asserted_sided & denied_sided}
    return [g for g in COARSE_FINDINGS if g in clash]


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# Where a sentence may be cut into clauses: after a comma or semicolon, before a connective.
_CLAUSE_BREAK = re.compile(r"(?<=[,;])\s+|\s+(?=(?:and|with|without|but|however|while|"
                           r"whereas|although)\b)", re.IGNORECASE)


def _reading(text: str) -> tuple[set[str], set[str]]:
    """(groups asserted, groups denied) by a piece of text read alone."""
    cleaned = " ".join(sentences(text))
    asserted = {g for g, v in coarse_labels(cleaned).items() if v and g != "no_finding"}
    groups, sided = denied(cleaned)
    return asserted, groups | {coarse_group(name) for name in sided}


def _repaired_sentence(sentence: str, clash: set[str], present: set[str] | None) -> str:
    """The sentence as the repair leaves it: whole, cut after its last clause that does not
    make the report contradict itself, or "" (dropped).

    An offending clause denies a clashing group the findings hold (`present`; None: every
    assertion is held), or asserts one they do not. A sentence that also asserts a held
    finding is never dropped: its offending tail is cut off when the clauses before it assert
    something ("Cardiomegaly without pleural effusion." -> "Cardiomegaly."), else it stays
    whole."""
    def offends(asserted: set[str], denied: set[str]) -> bool:
        return any(g in denied if present is None or g in present else g in asserted
                   for g in clash)

    def holds(asserted: set[str]) -> bool:
        return bool(asserted if present is None else asserted & present)

    asserted, denied = _reading(sentence)
    if not offends(asserted, denied):
        return sentence
    pieces = _CLAUSE_BREAK.split(sentence.strip())
    readings = [_reading(piece) for piece in pieces]
    held = holds(asserted) or any(holds(a) for a, _ in readings)
    cut = next((i for i, reading in enumerate(readings) if offends(*reading)), 0)
    if cut and not any(holds(a) for a, _ in readings[cut:]):
        head = " ".join(pieces[:cut]).rstrip(" ,;")
        head_asserted, head_denied = _reading(head)
        if head_asserted and not offends(head_asserted, head_denied):
            return head + "."
    return sentence if held else ""


def resolve_contradictions(report: str, present: set[str] | None = None) -> str:
    """The report without what makes it contradict itself: for each finding group both
    asserted and denied, the denials go when the group is `present` (the findings the report
    was written from; None: keep every assertion, a finding is never dropped), else the
    assertions. A sentence that asserts a present finding is never dropped: its offending
    clauses are cut off when they end it, else it is kept whole (`_repaired_sentence`).
    Nothing is added or reworded: what stays is the writer's own text."""
    clash = set(contradictions(report))
    if not clash:
        return report
    kept = [_repaired_sentence(sentence, clash, present)
            for sentence in _SENTENCE_BREAK.split(report.strip())]
    return " ".join(k for k in kept if k) or report


def findings_first(report: str) -> str:
    """The report with each finding's first statement moved to its start, in the order the
    prompt names findings (`STATED_ORDER`); every other sentence keeps its place after them
    (the normal statements, then a closing impression that names the findings again).

    A report's findings section has no fixed order, and a greedy writer puts at each sentence
    break the sentence most reports have there: the normal statements every report shares
    win, and a finding whose sentence sits anywhere (a device, a rib fracture) is never the
    likeliest next one, so it is left out though its prompt names it. Trained on this order,
    the writer states the findings it was given first. Only the order changes: the same
    sentences, word for word."""
    first, rest = findings_first_parts(report)
    return " ".join(first + rest)


def findings_first_parts(report: str) -> tuple[list[str], list[str]]:
    """`findings_first`'s two parts: the sentences that state each finding first, in the
    prompt's order, and every other sentence in its place."""
    parts = _SENTENCE_BREAK.split(report.strip())
    rank = {group: i for i, group in enumerate(STATED_ORDER)}
    stated: set[str] = set()
    first, rest = [], []
    for index, sentence in enumerate(parts):
        groups = {g for g, v in coarse_labels(" ".join(sentences(sentence))).items()
                  if v and g != "no_finding"}
        new = groups - stated
        stated |= groups
        if new:
            first.append((min(rank[g] for g in new), index, sentence))
        else:
            rest.append(sentence)
    return [s for *_, s in sorted(first)], rest


@dataclass(frozen=True)
class ReportReading:
    """How one report reads as a report."""

    in_form: int
    sentences: int
    foreign: int
    words: int
    preamble: bool
    contradicted: tuple[str, ...]

    @property
    def form_share(self) -> float:
        return self.in_form / self.sentences if self.sentences else 0.0


def read_report(report: str, style: ReportStyle) -> ReportReading:
    """Report form, foreign words, preamble and contradictions of one report."""
    in_form, n = style.form(report)
    foreign, words = style.foreign_words(report)
    return ReportReading(in_form, n, foreign, words, has_preamble(report),
                         tuple(contradictions(report)))


def language_scores(reports: Sequence[str], style: ReportStyle) -> dict[str, float]:
    """Corpus scores: `report_form` (pooled sentence share), `foreign_word_share`,
    `preamble_share`, `contradiction_share` (reports), `mean_words`."""
    if not reports:
        raise ValueError("language scores need at least one report")
    readings = [read_report(r, style) for r in reports]
    n_sentences = sum(r.sentences for r in readings)
    n_words = sum(r.words for r in readings)
    return {"report_form": sum(r.in_form for r in readings) / n_sentences if n_sentences else 0.0,
            "foreign_word_share": sum(r.foreign for r in readings) / n_words if n_words else 0.0,
            "preamble_share": sum(r.preamble for r in readings) / len(readings),
            "contradiction_share": sum(bool(r.contradicted) for r in readings) / len(readings),
            "mean_words": n_words / len(readings)}


def examples(reports: Sequence[str], style: ReportStyle, limit: int = 3) -> Mapping[str, list]:
    """A few offending reports per problem, for logs and the model page."""
    out: dict[str, list] = {"preamble": [], "contradiction": [], "out_of_form": []}
    for report in reports:
        reading = read_report(report, style)
        if reading.preamble and len(out["preamble"]) < limit:
            out["preamble"].append(report)
        if reading.contradicted and len(out["contradiction"]) < limit:
            out["contradiction"].append(report)
        if reading.form_share < 0.5 and len(out["out_of_form"]) < limit:
            out["out_of_form"].append(report)
    return out
