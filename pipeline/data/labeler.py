"""Rule-based finding labeler for chest X-ray reports, with clause-scoped negation.

`label_report(text)` reads any report (free text, any case, R2Gen-cleaned text such as
"the heart is enlarged . no effusion .") and returns `{finding: 0/1}` over `FINDINGS`.

How it reads:
- The text is split into sentences and then clauses ("but", "however", "otherwise", ...).
- A finding is a mention (a regex) that is affirmed. A mention is negated by a cue before it
  in its clause ("no", "without", "negative for", "free of", "no evidence of", "resolved",
  ...; for devices also "removal of", "removed") or by a cue after it ("... is not seen",
  "... has resolved"; a device's "... has been removed"). Uncertain mentions ("possible",
  "cannot be excluded") count as affirmed. One affirmed mention sets the label;
  negated mentions never clear a label set elsewhere in the report.
- Side and lung zone come from the mention's own noun phrase ("small left pleural
  effusion"), else from a locative after it ("nodule in the right upper zone"), else from the
  nearest side/zone word in its part of the clause. "Left" and "right" are the patient's.
  A finding whose side (or, for nodules and consolidation, zone) cannot be read gets the
  unlocalised fine label of its kind (`effusion_unlocalised`, ...; `UNLOCALISED`), which
  `label_report` returns beside the placed ones and `no_finding`: it is a finding,
  never "no finding", though no side-specific label can be matched to it (unless the report
  places that finding in another mention: "lingula consolidation, likely pneumonia").
- `no_finding` is 1 exactly when no other finding (unlocalised ones included) is.

`coarse_labels(text)` reads the same report into `COARSE_FINDINGS`: eleven groups that ignore
side and zone ("There is a large pleural effusion." -> effusion), and `no_finding`; the unit
that small models and small datasets can be judged on. Each group is one of CheXpert's 14
observations (`CHEXPERT_OF`); Pneumonia and Pleural Other have no group of their own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
# Kinds by how they are placed: side and zone, side only, or not at all.
ZONED = ("nodule", "consolidation")
SIDED = ("effusion", "pneumothorax", "atelectasis", "opacity", "fracture")
DEVICES = ("devices_tube", "devices_line", "devices_pacemaker")  # group `devices`, by kind
UNPLACED = ("cardiomegaly", "enlarged_cardiomediastinum", "edema", *DEVICES)
FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "effusion_left", "effusion_right",
    "pneumothorax_left", "pneumothorax_right",
    *(f"nodule_{side}_{zone}" for side in SIDES for zone in ZONES),
    *(f"consolidation_{side}_{zone}" for side in SIDES for zone in ZONES),
    "enlarged_cardiomediastinum",
    *(f"{kind}_{side}" for kind in ("atelectasis", "opacity", "fracture") for side in SIDES),
    "edema", *DEVICES,
    "no_finding",
)
# An affirmed finding whose place cannot be read (read by `label_report`, not predicted by
# the finding head: it has nothing to localise).
UNLOCALISED: tuple[str, ...] = tuple(f"{kind}_unlocalised" for kind in (*ZONED, *SIDED))
# Coarse groups: any side or zone, unlocalised mentions counted. Fine label -> group by prefix.
COARSE_FINDINGS: tuple[str, ...] = ("cardiomegaly", "effusion", "pneumothorax", "nodule",
                                    "consolidation", "enlarged_cardiomediastinum",
                                    "atelectasis", "opacity", "fracture", "edema", "devices",
                                    "no_finding")
# The order in which a prompt names the findings and `findings_first` states them: tubes and
# lines first, as reports commonly list them, then the groups in `COARSE_FINDINGS` order.
STATED_ORDER: tuple[str, ...] = ("devices",) + tuple(g for g in COARSE_FINDINGS
                                                      if g != "devices")
# Each coarse group as the CheXpert observation it reports (`pipeline.data.chexpert`).
CHEXPERT_OF = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion",
               "pneumothorax": "Pneumothorax", "nodule": "Lung Lesion",
               "consolidation": "Consolidation",
               "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
               "atelectasis": "Atelectasis", "opacity": "Lung Opacity", "fracture": "Fracture",
               "edema": "Edema", "devices": "Support Devices", "no_finding": "No Finding"}

# (kind, pattern, predicative). A predicative mention carries its own verb ("the heart is
# enlarged"), so a negation cue after it belongs to some other subject.
_MENTIONS = [
    ("cardiomegaly", r"cardiomegaly|(?:cardiac|heart) enlargement|large heart"
                     r"|enlarge(?:d|ment of(?: the)?) (?:heart|cardiac|cardiomediastinal)"
                     r"(?: silhouette| size| shadow| contours?)?", False),
    ("cardiomegaly", r"(?:heart|cardiac|cardiomediastinal)(?: silhouette| size| shadow| contours?)?"
                     r" (?:is|are|appears|remains|seems|looks)"
                     r"(?: (?:mildly|moderately|markedly|severely|slightly|significantly|again"
                     r"|still|stably|now|borderline))* (?:enlarged|large|increased|prominent)",
     True),
    ("effusion", r"(?<!pericardial )effusions?|pleural fluid|hydrothorax"
                 r"|blunt(?:ed|ing)(?: of)?(?: the)?(?: (?:left|right|bilateral))?"
                 r" costophrenic(?: angles?| sulcus| sulci)?", False),
    ("effusion", r"costophrenic (?:angles?|sulcus|sulci) (?:is |are )?"
                 r"(?:(?:again|now|mildly|slightly) )*blunted", True),
    ("pneumothorax", r"pneumothorax|pneumothoraces", False),
    ("nodule", r"nodules?|nodular (?:opacity|opacities|density|densities|lesions?)"
               r"|mass(?:es)?(?! effect)", False),
    ("consolidation", r"consolidat\w*(?: (?:opacity|opacities|changes?))?"
                      r"|airspace (?:disease|opacity|opacities|opacification|process)"
                      r"|pneumonias?|infiltrates?|infiltration", False),
    ("enlarged_cardiomediastinum",
     r"(?:widened|widening of(?: the)?|wide|prominent|enlarged) (?:superior )?"
     r"(?:mediastinum|mediastinal(?: silhouette| contours?| width)?)", False),
    ("enlarged_cardiomediastinum",
     r"(?:superior )?(?:mediastinum|mediastinal(?: silhouette| contours?| width)?)"
     r" (?:is|are|appears|remains|seems)(?: (?:mildly|moderately|markedly|slightly|again"
     r"|still|now))* (?:widened|wide|prominent|enlarged)", True),
    ("atelectasis", r"atelecta(?:sis|ses|tic(?: changes?)?)", False),
    ("opacity", r"(?:hazy|ground[- ]glass|ill[- ]defined|veil[- ]like)(?: lung| pulmonary)?"
                r" (?:opacity|opacities|opacification)|lung opacit(?:y|ies)", False),
    # An opacity placed in a lung, or on a side, and not named as something else (nodular,
    # airspace, consolidative): CheXpert's Lung Opacity ("mild opacity in the left lung").
    ("opacity", r"(?<!nodular )(?<!airspace )(?<!consolidative )(?<!rounded )"
                r"(?:opacity|opacities|opacification) (?:in|over|of|at|within) the"
                r"(?: (?:left|right|bilateral))? lungs?"
                r"|(?:left|right|bilateral)(?: sided)? (?:lung )?opacit(?:y|ies)", False),
    ("fracture", r"fractures?", False),
    ("edema", r"edema", False),
    ("devices_tube", r"(?:endotracheal|tracheostomy|enteric|nasogastric|feeding) tube", False),
    ("devices_line", r"(?:central venous|central|picc) (?:line|catheter)", False),
    ("devices_pacemaker", r"pacemaker|pacer|defibrillator", False),
]
_MENTION_RES = [(kind, re.compile(rf"\b(?:{pat})\b"), pred) for kind, pat, pred in _MENTIONS]

_PRE_CUES = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|absent|nor"
                       r"|resolved|resolution of|clear of|never)\b")
_POST_CUES = re.compile(r"\b(?:not (?:seen|identified|present|visualized|appreciated|demonstrated"
                        r"|evident|noted|detected|visible|shown|clearly seen)|absent|resolved"
                        r"|cleared|excluded|ruled out)\b")
# A removed device is gone ("status post removal of the endotracheal tube", "the nasogastric
# tube has been removed"); these cues negate devices only, so "removal of the chest tube with
# right basilar atelectasis" keeps the atelectasis.
_REMOVAL_PRE_CUES = re.compile(r"\b(?:removal of|removed)\b")
_REMOVAL_POST_CUES = re.compile(r"\bremoved\b")
# A new "there is ..." starts a new statement, so a "no" before it does not reach past it.
_SCOPE_BREAK = re.compile(r"\bthere (?:is|are|was|were|has been|have been)\b(?! no\b)")
_CLAUSE_SPLIT = re.compile(r"\b(?:but|however|although|though|whereas|while|otherwise|except"
                           r"|apart from|aside from)\b")
_NORMALISE = [
    (re.compile(r"\d+(?:\.\d+)?"), " num "),
    (re.compile(r"[-_/()\[\]\"']"), " "),
    (re.compile(r"\bair space\b"), "airspace"),
    (re.compile(r"\bcan ?not\b"), "cannot"),
    (re.compile(r"\b(?:cannot be|not be|not) (?:excluded|ruled out)\b"), "possible"),
    (re.compile(r"\bno (?:significant |interval |substantial )*(?:change|increase|decrease"
                r"|improvement|worsening)\b"), "unchanged"),
    (re.compile(r"\bno longer\b"), "not"),
    (re.compile(r"\b(?:left and right|right and left|both|bilaterally)\b"), "bilateral"),
    (re.compile(r"\bbi(basilar|basal|apical)\b"), r"bilateral \1"),
    (re.compile(r"[.;:!?]+"), " . "),
    (re.compile(r","), " , "),
    (re.compile(r"[^a-z0-9 .,]"), " "),
]

_SIDE_WORDS = {"left": ("left",), "right": ("right",), "bilateral": SIDES,
               "lingula": ("left",), "lingular": ("left",)}
_ZONE_WORDS = {
    **dict.fromkeys(("upper", "apex", "apical", "apices", "superior"), "upper"),
    **dict.fromkeys(("middle", "mid", "midlung", "lingula", "lingular"), "middle"),
    **dict.fromkeys(("lower", "base", "bases", "basal", "basilar", "inferior"), "lower"),
}
# Words that may sit inside a finding's noun phrase ("a small left upper zone pulmonary").
_NP_WORDS = {"a", "an", "the", "small", "large", "moderate", "tiny", "trace", "mild", "focal",
             "patchy", "new", "pleural", "pulmonary", "lung", "zone", "zones", "lobe", "lobes",
             "sided", "num", "mm", "cm", "solitary", "rounded", "dense", "subpleural",
             "moderately", "large", "loculated", "layering", "apical", "basal", "lateral",
             "medial", "hemithorax", "perihilar", "peripheral", "and", "of"}
# Tokens that separate one finding's phrase from the next in a clause.
_SPLITTERS = {"and", "or", ",", "with", "without", "plus", "also", "as", "which"}
# Tokens allowed between mentions that share a trailing negation ("x and y have resolved").
_LIST_WORDS = _NP_WORDS | set(_SIDE_WORDS) | set(_ZONE_WORDS) | {"or", ",", "either", "on",
                                                                "in", "at"}
_COPULA = {"is", "are", "was", "were", "seen", "noted", "present", "identified", "projects",
           "projecting", "project", "located", "visualized", "again", "also", "there"}
_PREPOSITIONS = {"in", "at", "on", "within", "involving", "of", "over", "overlying", "along",
                 "throughout"}


@dataclass(frozen=True)
class _Mention:
    kind: str
    start: int  # token index of the first word
    end: int  # token index after the last word
    predicative: bool


def _normalise(text: str) -> str:
    text = text.lower()
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return " ".join(text.split())


def _clauses(text: str) -> list[list[str]]:
    out = []
    for sentence in _normalise(text).split(" . "):
        for clause in _CLAUSE_SPLIT.split(sentence.strip(" .")):
            tokens = clause.split()
            if tokens:
                out.append(tokens)
    return out


def _token_index(clause: str, char_pos: int) -> int:
    return clause.count(" ", 0, char_pos)


def _find_mentions(clause: str) -> list[_Mention]:
    found: list[_Mention] = []
    for kind, regex, predicative in _MENTION_RES:
        for match in regex.finditer(clause):
            start = _token_index(clause, match.start())
            end = _token_index(clause, match.end()) + 1
            if not any(m.start < end and start < m.end for m in found):
                found.append(_Mention(kind, start, end, predicative))
    return sorted(found, key=lambda m: m.start)


def _cue_tokens(clause: str, regex: re.Pattern) -> list[int]:
    return [_token_index(clause, m.start()) for m in regex.finditer(clause)]


def _pre_negated(m: _Mention, tokens: list[str], cues: list[int], breaks: list[int]) -> bool:
    for cue in cues:
        if cue >= m.start or any(cue < b < m.start for b in breaks):
            continue
        # "no effusion and the heart is enlarged": the verb gives the heart its own statement.
        if m.predicative and any(t in {"and", ",", "with"} for t in tokens[cue:m.start]):
            continue
        return True
    return False


def _post_negated(index: int, mentions: list[_Mention], tokens: list[str],
                  cues: list[int]) -> bool:
    """True if a trailing cue ("... has resolved") negates mentions[index] and its list."""
    if mentions[index].predicative:
        return False
    last = index
    while last + 1 < len(mentions) and not mentions[last + 1].predicative and all(
            t in _LIST_WORDS for t in tokens[mentions[last].end:mentions[last + 1].start]):
        last += 1
    end = mentions[last].end
    nxt = mentions[last + 1].start if last + 1 < len(mentions) else len(tokens)
    return any(end <= cue < nxt and not (set(tokens[end:cue]) & _SPLITTERS) for cue in cues)


def _regions(mentions: list[_Mention], tokens: list[str]) -> list[tuple[int, int]]:
    """Each mention's part of the clause: split between mentions at the first separator."""
    cuts = [0]
    for left, right in zip(mentions, mentions[1:]):
        between = range(left.end, right.start)
        cuts.append(next((i for i in between if tokens[i] in _SPLITTERS), right.start))
    cuts.append(len(tokens))
    return list(zip(cuts[:-1], cuts[1:]))


def _words(tokens: list[str], table: dict) -> set[str]:
    out: set[str] = set()
    for token in tokens:
        value = table.get(token)
        if value is not None:
            out.update(value if isinstance(value, tuple) else (value,))
    return out


def _nearest(tokens: list[str], table: dict, backwards: bool) -> set[str]:
    for token in (reversed(tokens) if backwards else tokens):
        if token in table:
            return _words([token], table)
    return set()


def _locate(m: _Mention, tokens: list[str], region: tuple[int, int]) -> tuple[set, set]:
    """(sides, zones) of a mention: own phrase, then trailing locative, then nearest word."""
    start, stop = region
    phrase_start = m.start
    while phrase_start > start and (tokens[phrase_start - 1] in _NP_WORDS
                                    or tokens[phrase_start - 1] in _SIDE_WORDS
                                    or tokens[phrase_start - 1] in _ZONE_WORDS):
        phrase_start -= 1
    phrase = [t for t in tokens[phrase_start:m.end] if t not in {"and", "of"}]
    sides, zones = _words(phrase, _SIDE_WORDS), _words(phrase, _ZONE_WORDS)
    after = tokens[m.end:stop]
    skip = 0
    while skip < len(after) and after[skip] in _COPULA:
        skip += 1
    if skip < len(after) and after[skip] in _PREPOSITIONS:
        locative = []
        for token in after[skip:]:
            if token in _SPLITTERS - {"and"}:
                break
            locative.append(token)
        sides = sides or _words(locative, _SIDE_WORDS)
        zones = zones or _words(locative, _ZONE_WORDS)
    before = tokens[start:m.end]
    sides = sides or _nearest(before, _SIDE_WORDS, True) or _nearest(after, _SIDE_WORDS, False)
    zones = zones or _nearest(before, _ZONE_WORDS, True) or _nearest(after, _ZONE_WORDS, False)
    return sides, zones


def _clause_findings(tokens: list[str]) -> set[str]:
    """Fine labels affirmed in a clause, plus `group:<kind>` for every affirmed mention."""
    clause = " ".join(tokens)
    mentions = _find_mentions(clause)
    if not mentions:
        return set()
    pre, post = _cue_tokens(clause, _PRE_CUES), _cue_tokens(clause, _POST_CUES)
    device_pre = sorted(pre + _cue_tokens(clause, _REMOVAL_PRE_CUES))
    device_post = sorted(post + _cue_tokens(clause, _REMOVAL_POST_CUES))
    breaks = _cue_tokens(clause, _SCOPE_BREAK)
    out: set[str] = set()
    for index, (m, region) in enumerate(zip(mentions, _regions(mentions, tokens))):
        m_pre, m_post = (device_pre, device_post) if m.kind in DEVICES else (pre, post)
        if _pre_negated(m, tokens, m_pre, breaks) or _post_negated(index, mentions, tokens,
                                                                   m_post):
            continue
        if m.kind in UNPLACED:
            out.add(m.kind)
            continue
        sides, zones = _locate(m, tokens, region)
        out.add(f"group:{m.kind}")  # the coarse group, whether or not its place can be read
        placed = {f"{m.kind}_{side}" for side in sides} if m.kind in SIDED \
            else {f"{m.kind}_{side}_{zone}" for side in sides for zone in zones}
        out |= placed or {f"{m.kind}_unlocalised"}
    return out


def _read(text: str) -> set[str]:
    found: set[str] = set()
    for tokens in _clauses(text):
        found |= _clause_findings(tokens)
    return found


def label_report(text: str) -> dict[str, int]:
    """Read a report's findings as `{finding: 0/1}` over `FINDINGS` and `UNLOCALISED` (see
    module docstring)."""
    found = {name for name in _read(text) if not name.startswith("group:")}
    # "Lingula consolidation, likely pneumonia": a placed mention says where the other one is.
    found -= {f"{coarse_group(name)}_unlocalised" for name in found if name not in UNLOCALISED}
    labels = {name: int(name in found) for name in (*FINDINGS[:-1], *UNLOCALISED, "no_finding")}
    labels["no_finding"] = int(not found)
    return labels


def coarse_group(finding: str) -> str:
    """The coarse group of a fine label (`effusion_left` -> `effusion`)."""
    return finding if finding in COARSE_FINDINGS else finding.split("_", 1)[0]


def to_coarse(labels: dict[str, int]) -> dict[str, int]:
    """Fine labels -> coarse groups (a group is 1 when any of its fine labels is)."""
    out = dict.fromkeys(COARSE_FINDINGS, 0)
    for name, value in labels.items():
        if value and name != "no_finding":
            out[coarse_group(name)] = 1
    out["no_finding"] = int(not any(out.values()))
    return out


def coarse_labels(text: str) -> dict[str, int]:
    """Read a report's findings as `{group: 0/1}` over `COARSE_FINDINGS`, unlocalised counted."""
    found = {coarse_group(name.removeprefix("group:")) for name in _read(text)}
    out = {name: int(name in found) for name in COARSE_FINDINGS}
    out["no_finding"] = int(not any(v for k, v in out.items() if k != "no_finding"))
    return out
