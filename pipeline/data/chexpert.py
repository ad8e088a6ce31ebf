"""A rule labeler for CheXpert's 14 observations: the label space of report-generation papers.

`label_chexpert(report)` gives each observation 1 (positive), 0 (negative), -1 (uncertain) or
None (not mentioned). It reads real reports (IU X-Ray, MIMIC-CXR wording). The engine below
(`read_mentions`: every mention with its status, clause by clause) is the project's one
reading of report text: the finding labels of `pipeline.data.labeler` (group, side, zone,
device kind) are a view on the same mentions.

How a report is read:
1. Sentences (split at ". ", ";", "!", "?", line breaks; decimals kept), then clauses: a
   negation or uncertainty does not cross "but", "however", "although", "except", "which",
   "whereas", "there is/are", ... (`_CLAUSE_BREAK`).
2. Observation phrases decided by themselves: "heart size is within normal limits" is a
   negative cardiomegaly mention, "borderline heart size" an uncertain one (`_DIRECT`).
3. Mentions: phrases per observation (`_MENTIONS`); words that look like a mention but are
   not are removed first ("B-lines" and "Kerley lines" are not devices, "pericardial
   effusion" is not a pleural one: `_NOT_MENTIONS`).
4. Each mention takes the nearest trigger before it in its clause, within `_PRE_SCOPE` words
   (a list such as "no edema, effusion or pneumonia" stays inside it), or after it within
   `_POST_SCOPE` words ("pneumonia has resolved", "effusion cannot be excluded"):
   - uncertainty phrases that contain a negation are found first ("cannot exclude", "not
     ruled out"), pseudo-negations are blanked ("no change in", "not changed");
   - negation: no, not, without, free of, negative for, absence of, resolved, ...;
   - uncertainty: may, might, could, possible, probable, likely, questionable, suspicious
     for, versus (which also reaches back: "atelectasis versus pneumonia"), ...;
   - a "suggest"-type trigger after a negation keeps the negation ("no opacity to suggest
     pneumonia" is negative for pneumonia).
5. Mentions of one observation combine: positive over uncertain over negative.
6. No Finding is 1 when no observation other than Support Devices is positive or uncertain,
   else None (it is never 0, as in CheXpert).

Hand-written scopes rather than negspacy/medspacy ConText. medspacy did not install from PyPI
here (its source package fails to build). negspacy installs (with spaCy, ~40 packages) but is
NegEx: negation only, no uncertainty. On the sentences of `tests/test_chexpert.py`, with the
same mention phrases and its `en_clinical` triggers, it found 10 of the 17 negatives (missed
"free of", "has been removed", "within normal limits", ...), read "cannot exclude pneumonia"
as negative, and could not answer the 16 uncertain cases; these rules pass all of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_PRE_SCOPE = 8  # words between a trigger and the mention it governs
_POST_SCOPE = 5


def _rx(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_HEART = r"(?:heart|cardiac(?: silhouette| size| contours?| shadow)?)"
# "xxxx": a word removed by de-identification (IU X-Ray), standing for the noun or the verb.
_MEDIASTINUM = r"(?:cardio)?mediastin(?:um|al(?: silhouette| contours?| width| xxxx)?)"
_ANGLE = r"(?:angles?|sulc[iu]s?|xxxx)"
_NORMAL = (r"(?:(?:is|are|appears?|remains?|seems?|xxxx)\s+)*"
           r"(?:grossly\s+|overall\s+|otherwise\s+)?"
           r"(?:within normal limits|normal(?: in (?:size|caliber|contour|configuration))?|"
           r"unremarkable|not (?:enlarged|widened))")
_UPPER_NORMAL = r"(?:(?:is|are|at)\s+)*(?:the\s+)?(?:upper limits? of normal|top normal|high normal)"

# Phrases that decide an observation's status by themselves.
_DIRECT: dict[str, list[tuple[re.Pattern, int]]] = {
    "Cardiomegaly": [
        (_rx(rf"\b{_HEART}\s+(?:size\s+)?{_UPPER_NORMAL}", r"\bborderline (?:cardiomegaly|"
             r"enlarge\w* (?:heart|cardiac)|heart size|cardiac size|enlarged)",
             rf"\b{_HEART}(?: size)?\s+(?:(?:is|appears?|remains?)\s+)?borderline",
             r"\b(?:top|upper|high)[- ]normal (?:heart|cardiac)"), UNCERTAIN),
        (_rx(rf"\b{_HEART}(?: size)?(?: and (?:the )?(?:\w+ ){{1,3}}?)?\s*{_NORMAL}",
             r"\bnormal(?:-sized)? (?:heart|cardiac)(?: size| silhouette)?\b",
             r"\b(?:heart|cardiac silhouette) (?:is )?normal in size"), NEGATIVE)],
    "Enlarged Cardiomediastinum": [
        (_rx(rf"\b{_MEDIASTINUM}(?: and (?:the )?(?:\w+ ){{1,3}}?)?\s*{_NORMAL}",
             r"\bnormal (?:cardio)?mediastin\w*(?: silhouette| contours?)?"), NEGATIVE)],
    "Pleural Effusion": [
        (_rx(rf"\bcostophrenic {_ANGLE} (?:(?:is|are|remain)\s+)?(?:sharp|clear)"),
         NEGATIVE)],
}

_MENTIONS: dict[str, re.Pattern] = {
    "Enlarged Cardiomediastinum": _rx(
        rf"\b(?:enlarged|enlargement of the|widened|widening of the|prominent) (?:superior )?"
        rf"{_MEDIASTINUM}",
        rf"\b{_MEDIASTINUM}\s+(?:(?:is|are|appears?|remains?)\s+)*(?:\w+\s+){{0,3}}?"
        r"(?:enlarged|widened|widening|prominent)",
        r"\bmediastinal (?:widening|enlargement|mass|shift)"),
    "Cardiomegaly": _rx(
        r"\bcardiomegaly\b", r"\b(?:enlarged|large) (?:heart|cardiac silhouette)",
        r"\bcardiac enlargement", r"\benlargement of the (?:heart|cardiac silhouette)",
        rf"\b{_HEART}\s+(?:size\s+)?(?:(?:is|are|appears?|remains?)\s+)*(?:\w+\s+){{0,3}}?"
        r"enlarged"),
    "Lung Opacity": _rx(
        r"\bopaci(?:ty|ties|fication|fied)\b", r"\bair[- ]?space (?:disease|process)",
        r"\binfiltrat(?:e|es|ion|ive)\b", r"\bdensit(?:y|ies)\b", r"\bhaz(?:e|iness|y)\b",
        r"\binterstitial (?:markings?|prominence|pattern|thickening|opacit\w+|disease)",
        r"\breticula(?:r|tion|onodular)\b", r"(?<!pleural )(?<!pleural-)\bscar(?:ring|s)?\b",
        r"\bperibronchial (?:thickening|cuffing)"),
    "Lung Lesion": _rx(
        r"\bnodul(?:e|es|ar)\b", r"\bmass(?:es)?\b(?! effect)", r"\blesions?\b",
        r"\bgranulomas?\b", r"\bgranulomatous\b", r"\btumou?rs?\b", r"\bneoplasms?\b",
        r"\bcarcinoma\b", r"\bmetasta\w+", r"\bcavitary\b", r"\bcavitation\b"),
    "Edema": _rx(
        r"\bedema\b", r"\boedema\b", r"\b(?:pulmonary |vascular |venous )+congestion\b",
        r"\bvascular engorgement\b", r"\bcephalization\b", r"\bheart failure\b", r"\bchf\b",
        r"\bkerley\b"),
    "Consolidation": _rx(r"\bconsolidat(?:ion|ions|ive|ed)\b"),
    "Pneumonia": _rx(r"\b(?:broncho)?pneumonias?\b", r"\binfect(?:ion|ions|ious)\b",
                     r"\bpneumonitis\b"),
    "Atelectasis": _rx(r"\batelecta\w+", r"\b(?:lung|lobar|lobe) collapse\b",
                       r"\bcollapse of the (?:\w+ ){0,3}(?:lung|lobe)"),
    "Pneumothorax": _rx(r"\b(?:hydro)?pneumothora(?:x|ces)\b", r"\bptx\b"),
    "Pleural Effusion": _rx(
        r"\beffusions?\b", r"\bpleural fluid\b", r"\bhydrothorax\b",
        r"\bhydropneumothorax\b", r"\bblunt(?:ing|ed)(?: of)?(?: the)? (?:\w+ ){0,2}costophrenic",
        rf"\bcostophrenic {_ANGLE} (?:(?:is|are)\s+)?blunt\w*"),
    "Pleural Other": _rx(
        r"\bpleural (?:thickening|plaques?|scarring|calcifications?|abnormalit\w+)",
        r"\bpleural[- ]parenchymal (?:scarring|thickening)", r"\bfibrothorax\b",
        r"\bapical (?:pleural )?(?:cap|capping)\b"),
    "Fracture": _rx(r"\bfractur(?:e|es|ed)\b", r"\bfx\b"),
    "Support Devices": _rx(
        r"\b(?:endotracheal|et|nasogastric|ng|og|orogastric|enteric|feeding|chest|"
        r"tracheostomy|dobhoff|drainage) tubes?\b", r"\btubes?\b",
        r"\bcatheters?\b", r"\bpicc\b",
        r"\b(?:central|venous|arterial|jugular|ij|subclavian|swan[- ]ganz|dialysis|port|"
        r"midline catheter|pacing|pacer) lines?\b",
        r"\bpace(?:maker|r)s?\b", r"\b(?:defibrillator|aicd|icd)s?\b",
        r"\b(?:pacer|pacemaker|pacing|icd|defibrillator|epicardial|transvenous) leads?\b",
        r"\b(?:medi)?port\b",
        r"\bsternotomy\b", r"\b(?:sternal |sternotomy |cerclage )?wires?\b",
        r"\b(?:surgical )?clips?\b", r"\bstaples\b", r"\bport-?a-?cath\b", r"\bstents?\b",
        r"\b(?:prosthetic|mechanical|replaced) (?:\w+ )?valve\b", r"\bvalve replacement\b",
        r"\blvad\b", r"\bimpella\b", r"\bdrains?\b", r"\b(?:orthopedic |spinal |surgical )?"
        r"hardware\b", r"\b(?:support |monitoring |cardiac )?devices?\b", r"\belectrodes?\b",
        r"\bcoils?\b"),
}

# Look like mentions, are not: blanked before mentions are searched.
_NOT_MENTIONS = _rx(
    r"\bb[- ]lines?\b", r"\bpericardial effusions?\b",
    r"\bjoint effusions?\b", r"\bshoulder effusions?\b", r"\bsubcutaneous emphysema\b",
    r"\bsoft tissue densit\w+", r"\bbreast (?:tissue )?densit\w+", r"\bnipple shadows?\b",
    r"\bmass effect\b", r"\bbody mass\b")

_UNCERTAIN_NEGATED = _rx(  # uncertainty written with a negation word: found first
    r"\bcan ?not (?:be )?(?:entirely |completely |definitely )?(?:exclude|excluded|"
    r"rule[sd]? out|ruled out)\b", r"\bcould not (?:be )?(?:exclude|excluded|ruled out)\b",
    r"\bnot (?:be )?(?:entirely |completely )?(?:excluded|ruled out)\b",
    r"\bdifficult to (?:exclude|rule out)\b", r"\bno definite\b(?= .* (?:versus|vs)\b)",
    r"\bnot (?:entirely )?(?:clear|certain)\b", r"\bunable to exclude\b")
_PSEUDO_NEGATION = _rx(
    r"\bno (?:significant |appreciable |substantial |definite |interval |other )?"
    r"(?:interval )?(?:change|increase|decrease|enlargement of)\b", r"\bnot (?:significantly |"
    r"substantially )?(?:changed|increased|decreased)\b", r"\bwithout (?:interval )?change\b",
    r"\bnot only\b", r"\bno longer\b(?= (?:(?:seen|visible|present|identified)\b))")
_NEGATION_PRE = _rx(
    r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bfree of\b", r"\bnegative for\b",
    r"\babsence of\b", r"\bno (?:evidence|signs?|findings?) of\b", r"\bresol(?:ved|ution of)\b",
    r"\bclear of\b", r"\bnor\b", r"\bneither\b", r"\bnever\b")
_NEGATION_POST = _rx(
    r"\b(?:has|have|is|are|now) (?:\w+ )?(?:resolved|cleared)\b",
    r"\b(?:is|are) (?:no longer|not) (?:seen|visible|present|identified|evident|"
    r"appreciated|demonstrated)\b", r"\b(?:is|are|was|were) absent\b",
    r"\bno longer (?:seen|visible|present|identified)\b")
# A removal negates a device only: "removal of the chest tube with basilar atelectasis".
_REMOVAL_POST = _rx(r"\b(?:(?:has|have|had|was|were|is|are)(?: \w+)?(?: been)? )?removed\b")
_REMOVAL_PRE = _rx(r"\bremov(?:ed|al of)\b")
_WEAK_UNCERTAIN = _rx(  # a preceding negation keeps the negation ("no X to suggest Y")
    r"\bto suggest\b", r"\bsuggest(?:s|ing|ive of)?\b", r"\bto indicate\b",
    r"\bindicat(?:e|es|ive of)\b", r"\bconcerning for\b", r"\bworrisome for\b")
_UNCERTAIN_PRE = _rx(
    r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bprobabl[ey]\b",
    r"\blikely\b", r"\bunlikely\b", r"\bquestionabl[ey]\b", r"\bquestion of\b",
    r"\bsuspicious (?:for|of)\b", r"\bsuspect(?:ed)?\b", r"\bconcern for\b",
    r"\bequivocal\b", r"\bborderline\b", r"\bindeterminate\b", r"\bpresum(?:ed|ably)\b",
    r"\bpossibility of\b", r"\bdifferential\b", r"\bcannot exclude\b", r"\bfavou?r(?:ed|s)?\b",
    r"\bpotential(?:ly)?\b", r"\bperhaps\b", r"\bversus\b", r"\bvs\.?")
_UNCERTAIN_POST = _rx(
    r"\b(?:is|are) (?:also |more |less )?(?:possible|likely|suspected|questioned|"
    r"not excluded|a consideration|considered)\b", r"\bversus\b", r"\bvs\b",
    # "pneumonia is felt to be unlikely": CheXpert reads "unlikely" as uncertain; "is unlikely
    # to represent pneumonia" leaves the subject to the mention after it.
    r"\b(?:is|are|was|were|seems?|appears?) (?:(?:felt|thought|considered|believed)"
    r" (?:to be )?)?(?:(?:much|far) )?(?:less |more )?(?:un)?likely\b(?! to\b)",
    r"\bmay be (?:present|seen)\b", r"\bcould be (?:present|seen)\b")
_BIDIRECTIONAL = _rx(r"\bversus\b", r"\bvs\b")
# A mention with its own verb ("the heart is enlarged") is a statement of its own: a trigger
# after it belongs to the next subject ("... and the pneumothorax is not seen").
_PREDICATIVE = _rx(r"\b(?:is|are|was|were|appears?|remains?|seems?|looks?)\b")

_CLAUSE_BREAK = re.compile(
    r"\b(?=(?:but|however|although|though|except|aside from|apart from|whereas|which|"
    r"otherwise|yet|there (?:is|are|has been|have been|remains?)|"
    r"with (?:interval |new |increased |persistent )?(?:development|increase|worsening)|"
    r"in addition|additionally|also noted)\b)")
_SENTENCE_BREAK = re.compile(r"(?<!\d)\.(?!\d)|[;!?\n]")


def _blank(text: str, pattern: re.Pattern) -> tuple[str, list[tuple[int, int]]]:
    """`text` with the matches of `pattern` turned into spaces (offsets kept), and the spans."""
    spans = [m.span() for m in pattern.finditer(text)]
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text, spans


def _triggers(clause: str) -> list[tuple[int, int, str]]:
    """[(start, end, kind)] of a clause's triggers. Kinds: "neg", "unc", "weak" govern the
    mentions after them, "post_neg" and "post_unc" those before, "bi" both."""
    found: list[tuple[int, int, str]] = []
    text, spans = _blank(clause, _UNCERTAIN_NEGATED)  # before "not" is read as a negation
    found += [(s, e, kind) for s, e in spans for kind in ("unc", "post_unc")]
    # Post-negations before the pseudo-negations: "is no longer seen" needs its "no longer".
    text, spans = _blank(text, _NEGATION_POST)
    found += [(s, e, "post_neg") for s, e in spans]
    text, _ = _blank(text, _PSEUDO_NEGATION)
    order = ((_REMOVAL_POST, "post_removed"), (_REMOVAL_PRE, "removed"),
             (_BIDIRECTIONAL, "bi"), (_UNCERTAIN_POST, "post_unc"),
             (_WEAK_UNCERTAIN, "weak"), (_NEGATION_PRE, "neg"), (_UNCERTAIN_PRE, "unc"))
    for pattern, kind in order:  # each blanked once found: "is not seen" is no pre-negation
        text, spans = _blank(text, pattern)
        found += [(s, e, kind) for s, e in spans]
    return found


def _status(plain: str, start: int, end: int, triggers: list[tuple[int, int, str]],
            device: bool = False, predicative: bool = False) -> int:
    """The status of the mention at [start, end). `plain` is the clause with every mention
    blanked, so that a list of findings does not use up a trigger's scope. Removal triggers
    negate a device and nothing else; a `predicative` mention takes no trigger after it."""
    removal = {"removed": "neg", "post_removed": "post_neg"}
    triggers = [(s, e, removal[k]) if k in removal else (s, e, k) for s, e, k in triggers
                if device or k not in removal]
    # A trigger inside the mention counts as before it ("the heart may be enlarged").
    before = [t for t in triggers if t[1] <= end and t[2] in ("neg", "unc", "weak", "bi")
              and _words(plain[t[1]:start]) <= _PRE_SCOPE]
    if before:
        kind = max(before, key=lambda t: t[1])[2]
        if kind == "neg" or kind == "weak" and any(t[2] == "neg" for t in before):
            return NEGATIVE
        return UNCERTAIN
    if predicative:
        return POSITIVE
    after = [t for t in triggers if t[0] >= end and t[2] in ("post_neg", "post_unc", "bi")
             and _words(plain[end:t[0]]) <= _POST_SCOPE]
    if after:
        return NEGATIVE if min(after)[2] == "post_neg" else UNCERTAIN
    return POSITIVE


def _words(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+", text))


def _clauses(report: str) -> list[str]:
    clauses = []
    for sentence in _SENTENCE_BREAK.split(report.lower()):
        clauses += [c for c in _CLAUSE_BREAK.split(sentence) if c.strip()]
    return clauses


@dataclass(frozen=True)
class Mention:
    """One mention the engine read: its observation and status, and where it sits (the
    lower-cased clause and the span of the mention's words in it)."""

    observation: str
    status: int
    clause: str
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.clause[self.start:self.end]


def _clause_mentions(clause: str) -> list[Mention]:
    """The clause's mentions in order: the phrases that decide an observation by themselves
    (`_DIRECT`), then every mention phrase with the status its triggers give it."""
    out: list[Mention] = []
    text = clause
    for name, rules in _DIRECT.items():
        # Each observation reads the whole clause: "cardiac and mediastinal contours are
        # normal" decides both; its own rules go in order (uncertain before negative).
        own = clause
        for pattern, status in rules:
            own, spans = _blank(own, pattern)
            out += [Mention(name, status, clause, start, end) for start, end in spans]
            for start, end in spans:
                text = text[:start] + " " * (end - start) + text[end:]
    text, _ = _blank(text, _NOT_MENTIONS)
    spans = [(name, m.start(), m.end()) for name, pattern in _MENTIONS.items()
             for m in pattern.finditer(text)]
    plain = text
    for _, start, end in spans:
        plain = plain[:start] + " " * (end - start) + plain[end:]
    triggers = _triggers(clause)
    out += [Mention(name, _status(plain, start, end, triggers, name == "Support Devices",
                                  bool(_PREDICATIVE.search(text, start, end))),
                    clause, start, end)
            for name, start, end in spans]
    return sorted(out, key=lambda m: (m.start, m.end))


def read_mentions(report: str) -> list[list[Mention]]:
    """Every mention of the report, clause by clause (a clause with none is left out): the one
    reading of report text that the CheXpert-14 labels and the finding labels
    (`pipeline.data.labeler`) are views on."""
    return [found for found in map(_clause_mentions, _clauses(report)) if found]


def label_chexpert(report: str) -> dict[str, int | None]:
    """{observation: 1 positive, 0 negative, -1 uncertain, None not mentioned} for the 14."""
    found: dict[str, list[int]] = {}
    for clause in read_mentions(report):
        for mention in clause:
            found.setdefault(mention.observation, []).append(mention.status)
    labels: dict[str, int | None] = dict.fromkeys(OBSERVATIONS)
    for name, statuses in found.items():
        labels[name] = (POSITIVE if POSITIVE in statuses else
                        UNCERTAIN if UNCERTAIN in statuses else NEGATIVE)
    abnormal = any(labels[n] in (POSITIVE, UNCERTAIN) for n in OBSERVATIONS
                   if n not in ("No Finding", "Support Devices"))
    labels["No Finding"] = None if abnormal else POSITIVE
    return labels


def binary(labels: Mapping[str, int | None], uncertain: int = POSITIVE) -> dict[str, int]:
    """0/1 labels for scoring: positive is 1, uncertain is `uncertain` (1, the papers' usual
    mapping, or 0), negative and not mentioned are 0."""
    return {name: int(labels[name] == POSITIVE or labels[name] == UNCERTAIN and uncertain == 1)
            for name in OBSERVATIONS}


def label_reports(reports: Sequence[str]) -> list[dict[str, int | None]]:
    """`label_chexpert` of each report."""
    return [label_chexpert(r) for r in reports]
