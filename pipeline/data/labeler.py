"""Finding labels: side, lung zone and device kind, a view on the CheXpert-14 engine's mentions.

`label_report(text)` returns `{finding: 0/1}` over `FINDINGS` (and `UNLOCALISED`);
`coarse_labels(text)` the eleven groups of `COARSE_FINDINGS`. Both read the report with
`pipeline.data.chexpert.read_mentions`, the one reading of report text in the project
(sentences, clauses, mention phrases, negation and uncertainty triggers and their scopes).
This module adds no phrases and no triggers of its own; it only says, for each mention the
engine read:

- **Which group.** Each group is one of CheXpert's observations (`CHEXPERT_OF`); Pneumonia
  counts as consolidation, Pleural Other and No Finding have no group. An opacity that its
  clause names as something more specific, read as present ("rounded opacity, likely a
  nodule", "airspace opacity consistent with consolidation", "perihilar haziness consistent
  with edema"), is that finding and not a lung opacity as well: each group says what the film
  shows once. (CheXpert's own labels, `label_chexpert`, also mark the parent Lung Opacity.)
- **Whether it is present.** Positive mentions are; uncertain ones follow the policy
  `uncertain` (`positive`: U-ones, the default; `negative`: U-zeros; for training targets also
  `ignore`, see `uncertain_findings`); negated ones never are, and never clear a finding that
  another mention affirms.
- **Where, or which device.** Side and zone come from the words around the mention: its own
  noun phrase ("small left pleural effusion"), else a locative after it ("nodule in the right
  upper zone"), else the nearest side or zone word in its part of the clause. "Left" and
  "right" are the patient's; "bibasilar" is both lower zones. A finding whose side (or, for
  nodules and consolidation, zone) cannot be read gets the unlocalised label of its kind
  (`effusion_unlocalised`, ...), dropped when the report places that finding in another
  mention ("lingula consolidation, likely pneumonia"). A device's kind comes from its
  mention: a tube (endotracheal, tracheostomy, nasogastric, feeding), a line (catheter, PICC,
  central, jugular or subclavian line, port) or a pacemaker (pacer, defibrillator, leads);
  any other device (chest tube, sternotomy wires, clips, stents, valves) is `devices_other`.
- `no_finding` is 1 exactly when no other finding (unlocalised ones included) is.

The unlocalised labels and `devices_other` are read but not predicted by the finding head
(it has nothing to place); every coarse group is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from pipeline.data.chexpert import POSITIVE, UNCERTAIN, Mention, read_mentions

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
OTHER_DEVICE = "devices_other"
# Read by `label_report`, not predicted by the finding head: a finding whose place cannot be
# read, and a device of no kind the head knows.
UNLOCALISED: tuple[str, ...] = (*(f"{kind}_unlocalised" for kind in (*ZONED, *SIDED)),
                                OTHER_DEVICE)
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
# How uncertain mentions count: U-ones, U-zeros, or (training targets) masked from the loss.
UNCERTAIN_POLICIES = ("positive", "negative", "ignore")

_GROUP_OF = {**{obs: group for group, obs in CHEXPERT_OF.items() if group != "no_finding"},
             "Pneumonia": "consolidation"}
# Findings an opacity in the same clause may be named as ("opacity, likely atelectasis").
_SPECIFIC = ("consolidation", "nodule", "atelectasis", "edema")
_DEVICE_KIND = [
    ("devices_tube", re.compile(r"\b(?:endotracheal|et|tracheostomy|nasogastric|ng|og|"
                                r"orogastric|enteric|feeding|dobhoff) tube")),
    ("devices_line", re.compile(r"\b(?:catheters?|picc|lines?|(?:medi)?port|port-?a-?cath)\b")),
    ("devices_pacemaker", re.compile(r"\b(?:pace|pacing|defibrillator|aicd|icd)")),
]

_SIDE_WORDS = {"left": ("left",), "right": ("right",), "bilateral": SIDES,
               "lingula": ("left",), "lingular": ("left",)}
_ZONE_WORDS = {
    **dict.fromkeys(("upper", "apex", "apical", "apices", "superior"), "upper"),
    **dict.fromkeys(("middle", "mid", "midlung", "lingula", "lingular"), "middle"),
    **dict.fromkeys(("lower", "base", "bases", "basal", "basilar", "inferior"), "lower"),
}
# One word read as two: "bibasilar" is "bilateral basilar".
_EXPAND = {"bibasilar": ("bilateral", "basilar"), "bibasal": ("bilateral", "basal"),
           "biapical": ("bilateral", "apical"), "both": ("bilateral",),
           "bilaterally": ("bilateral",)}
# Words that may sit inside a finding's noun phrase ("a small left upper zone pulmonary").
_NP_WORDS = {"a", "an", "the", "small", "large", "moderate", "tiny", "trace", "mild", "focal",
             "patchy", "new", "pleural", "pulmonary", "lung", "zone", "zones", "lobe", "lobes",
             "sided", "num", "mm", "cm", "solitary", "rounded", "dense", "subpleural",
             "moderately", "loculated", "layering", "apical", "basal", "lateral",
             "medial", "hemithorax", "perihilar", "peripheral", "and", "of"}
# Tokens that separate one finding's phrase from the next in a clause.
_SPLITTERS = {"and", "or", ",", "with", "without", "plus", "also", "as", "which"}
_COPULA = {"is", "are", "was", "were", "seen", "noted", "present", "identified", "projects",
           "projecting", "project", "located", "visualized", "again", "also", "there"}
_PREPOSITIONS = {"in", "at", "on", "within", "involving", "of", "over", "overlying", "along",
                 "throughout"}
_TOKEN = re.compile(r"[a-z0-9]+|,")


@dataclass(frozen=True)
class _Finding:
    kind: str  # a group, or a device kind
    present: bool
    start: int  # token index of the mention's first word
    end: int  # token index after its last word


def _tokens(clause: str) -> tuple[list[str], list[int]]:
    """The clause's words (numbers as "num", "bibasilar" as two) and each one's offset."""
    words, offsets = [], []
    for match in _TOKEN.finditer(clause):
        word = match.group()
        for part in _EXPAND.get(word, ("num",) if word.isdigit() else (word,)):
            words.append(part)
            offsets.append(match.start())
    return words, offsets


def _present(mention: Mention, affirm_uncertain: bool) -> bool:
    return mention.status == POSITIVE or affirm_uncertain and mention.status == UNCERTAIN


def _kind(mention: Mention, group: str) -> str:
    if group != "devices":
        return group
    return next((kind for kind, pattern in _DEVICE_KIND if pattern.search(mention.text)),
                OTHER_DEVICE)


# Words that name an opacity as something more specific: "opacity, likely pneumonia", "opacity
# which may represent atelectasis", "opacity consistent with edema".
_NAMES = {"likely", "probably", "possibly", "probable", "possible", "may", "might", "could",
          "represent", "represents", "representing", "reflect", "reflects", "reflecting",
          "consistent", "compatible", "suggestive", "suggesting", "suggest", "suggests",
          "concerning", "worrisome", "suspicious", "favor", "favored", "favoring", "due",
          "secondary", "from", "versus", "vs", "either", "exclude", "excluded", "concern",
          "question", "questionable", "differential", "include", "includes", "including",
          "indicate", "indicates", "indicating", "representative", "presumably", "presumed"}


def _names(tokens: list[str], a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the mention at token span `b` names the one at `a` (an opacity) as something
    more specific: a naming word between them, or no separator ("atelectatic opacity").
    "Left retrocardiac opacity and right basilar atelectasis" are two findings."""
    between = tokens[min(a[1], b[1]):max(a[0], b[0])]
    return any(t in _NAMES for t in between) or not any(t in _SPLITTERS for t in between)


def _clause_findings(mentions: list[Mention], tokens: list[str], offsets: list[int],
                     affirm_uncertain: bool) -> list[_Finding]:
    """The clause's mentions as findings: grouped, an opacity that the clause names as
    something more specific taken as that (with its presence), devices by kind; in token
    positions."""
    def span(m: Mention) -> tuple[int, int]:
        first = sum(offset < m.start for offset in offsets)
        return first, max(sum(offset < m.end for offset in offsets), first + 1)

    grouped = [(m, _GROUP_OF[m.observation]) for m in mentions if m.observation in _GROUP_OF]
    specific = [(m, g) for m, g in grouped if g in _SPECIFIC and _present(m, affirm_uncertain)]
    out = []
    for mention, group in grouped:
        present = _present(mention, affirm_uncertain)
        named = [(m, g) for m, g in specific if _names(tokens, span(mention), span(m))] \
            if group == "opacity" else []
        if named:
            nearest, group = min(named, key=lambda mg: abs(mg[0].start - mention.start))
            present = _present(nearest, affirm_uncertain)
        out.append(_Finding(_kind(mention, group), present, *span(mention)))
    return sorted(out, key=lambda f: (f.start, f.end))


def _regions(found: list[_Finding], tokens: list[str]) -> list[tuple[int, int]]:
    """Each mention's part of the clause: split between mentions at the first separator."""
    cuts = [0]
    for left, right in zip(found, found[1:]):
        between = range(left.end, right.start)
        cuts.append(next((i for i in between if tokens[i] in _SPLITTERS), max(right.start,
                                                                              left.end)))
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


def _locate(f: _Finding, tokens: list[str], region: tuple[int, int]) -> tuple[set, set]:
    """(sides, zones) of a mention: own phrase, then trailing locative, then nearest word."""
    start, stop = region
    phrase_start = f.start
    while phrase_start > start and (tokens[phrase_start - 1] in _NP_WORDS
                                    or tokens[phrase_start - 1] in _SIDE_WORDS
                                    or tokens[phrase_start - 1] in _ZONE_WORDS):
        phrase_start -= 1
    phrase = [t for t in tokens[phrase_start:f.end] if t not in {"and", "of"}]
    sides, zones = _words(phrase, _SIDE_WORDS), _words(phrase, _ZONE_WORDS)
    after = tokens[f.end:stop]
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
    before = tokens[start:f.end]
    sides = sides or _nearest(before, _SIDE_WORDS, True) or _nearest(after, _SIDE_WORDS, False)
    zones = zones or _nearest(before, _ZONE_WORDS, True) or _nearest(after, _ZONE_WORDS, False)
    return sides, zones


def _placed(f: _Finding, tokens: list[str], region: tuple[int, int]) -> set[str]:
    """The fine labels of one present finding, and `group:<group>` for its coarse group."""
    group = coarse_group(f.kind)
    if f.kind in UNPLACED or f.kind == OTHER_DEVICE:
        return {f.kind, f"group:{group}"}
    sides, zones = _locate(f, tokens, region)
    placed = {f"{f.kind}_{side}" for side in sides} if f.kind in SIDED \
        else {f"{f.kind}_{side}_{zone}" for side in sides for zone in zones}
    return (placed or {f"{f.kind}_unlocalised"}) | {f"group:{group}"}


@lru_cache(maxsize=65536)
def _read(text: str, affirm_uncertain: bool = True) -> frozenset[str]:
    """The fine labels the report affirms, and `group:<group>` for every present group."""
    found: set[str] = set()
    for mentions in read_mentions(text):
        tokens, offsets = _tokens(mentions[0].clause)
        clause = _clause_findings(mentions, tokens, offsets, affirm_uncertain)
        for f, region in zip(clause, _regions(clause, tokens)):
            if f.present:
                found |= _placed(f, tokens, region)
    # "Lingula consolidation, likely pneumonia": a placed mention says where the other one is.
    found -= {f"{coarse_group(name)}_unlocalised" for name in found
              if name not in UNLOCALISED and not name.startswith("group:")}
    return frozenset(found)


def _affirms_uncertain(uncertain: str) -> bool:
    if uncertain not in ("positive", "negative"):
        raise ValueError(f"uncertain must be 'positive' or 'negative' for 0/1 labels, got "
                         f"{uncertain!r} ('ignore' masks targets: uncertain_findings)")
    return uncertain == "positive"


def label_report(text: str, uncertain: str = "positive") -> dict[str, int]:
    """A report's findings as `{finding: 0/1}` over `FINDINGS` and `UNLOCALISED` (see module
    docstring); uncertain mentions count as `uncertain` says."""
    found = _read(text, _affirms_uncertain(uncertain))
    labels = {name: int(name in found) for name in (*FINDINGS[:-1], *UNLOCALISED)}
    labels["no_finding"] = int(not any(labels.values()))
    return labels


def coarse_labels(text: str, uncertain: str = "positive") -> dict[str, int]:
    """A report's findings as `{group: 0/1}` over `COARSE_FINDINGS`, unlocalised counted."""
    found = _read(text, _affirms_uncertain(uncertain))
    out = {name: int(f"group:{name}" in found) for name in COARSE_FINDINGS}
    out["no_finding"] = int(not any(v for k, v in out.items() if k != "no_finding"))
    return out


def uncertain_findings(text: str) -> set[str]:
    """The fine labels and groups whose value the uncertainty policy decides (they differ
    between U-ones and U-zeros): what `uncertain="ignore"` masks from the finding loss."""
    ones, zeros = label_report(text, "positive"), label_report(text, "negative")
    coarse_ones, coarse_zeros = coarse_labels(text, "positive"), coarse_labels(text, "negative")
    return {k for k in ones if ones[k] != zeros[k]} | \
        {k for k in coarse_ones if coarse_ones[k] != coarse_zeros[k]}


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


def named_findings(labels: Mapping[str, int]) -> frozenset[str]:
    """The findings a label set names (`no_finding` aside)."""
    return frozenset(name for name, value in labels.items() if value and name != "no_finding")


def covered(item: str, others: Iterable[str]) -> bool:
    """`item` is among `others`; a mention without a place matches its group anywhere."""
    others = set(others)
    return item in others or (item.endswith("_unlocalised")
                              and coarse_group(item) in {coarse_group(o) for o in others})
