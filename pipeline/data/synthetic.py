"""Synthetic chest-radiograph benchmark: drawn grayscale images with known findings and reports.

Each study samples a set of findings from eleven of CheXpert's observations (cardiomegaly,
a widened mediastinum, left/right pleural effusion, left/right pneumothorax, a nodule or mass
in one lung zone, consolidation in one lung zone, basal atelectasis, a hazy lung opacity, a
rib fracture, pulmonary edema, support devices: tube, central line, pacemaker; or none),
draws a PA radiograph that shows them, and writes an IU X-Ray style report (findings then
impression) with paraphrases, hedged wording for about one finding in five ("may represent
atelectasis", "cannot exclude"), negated statements for absent findings and varied sentence
order. Ground-truth labels over `FINDINGS` are stored with each entry. Patient left is on
the image's right, as on a real PA film.

Two versions: version 1 (`data=synthetic`, what the demo's recipe is measured on) draws the
first five kinds (cardiomegaly, effusion, pneumothorax, nodule/mass, consolidation) with no
hedging; version 2 (`data=synthetic-v2`) draws all eleven and hedges.

Output is the R2Gen layout, so one loader serves this and the real datasets:
`<out>/annotation.json` (`train`/`val`/`test` -> `{id, report, image_path, labels}`) and
`<out>/images/<id>/0.png`. Everything derives from one seed through numpy's Generator, and
PNGs carry no timestamps, so the same arguments give byte-identical files (same numpy and
Pillow versions, same platform).

    python -m pipeline.data.synthetic --out data/synthetic --seed 0 \\
        [--n-train 254 --n-val 32 --n-test 64 --image-size 224 --version 1]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.labeler import FINDINGS, SIDES, ZONES

VERSIONS = (1, 2)
SOURCES = {"synthetic": 1, "synthetic-v2": 2}  # the `data` value that names each version
META_NAME = "synthetic_meta.json"
# severity -> (effusion height, pneumothorax lung shrink) ranges in body coordinates
_SEVERITY = {"small": ((0.1, 0.18), (0.8, 0.88)), "moderate": ((0.18, 0.28), (0.7, 0.8)),
             "large": ((0.28, 0.4), (0.55, 0.7))}


DEVICES = ("tube", "line", "pacemaker")
KINDS = ("cardio", "effusion", "ptx", "nodule", "consol", "mediastinum", "atelectasis",
         "opacity", "fracture", "edema", "devices")


@dataclass(frozen=True)
class Study:
    """Sampled findings of one synthetic study; sides are the patient's."""

    cardiomegaly: bool
    effusion: tuple[str, ...]  # sides with an effusion
    pneumothorax: str | None  # side
    nodule: tuple[str, str, int] | None  # (side, zone, diameter in mm)
    consolidation: tuple[str, str] | None  # (side, zone)
    effusion_size: str = "small"  # small / moderate / large, drawn as stated
    pneumothorax_size: str = "small"
    mediastinum: bool = False  # widened
    atelectasis: str | None = None  # side of basal plate-like atelectasis
    opacity: str | None = None  # side of a hazy opacity
    fracture: str | None = None  # side of a lateral rib fracture
    edema: bool = False
    devices: tuple[str, ...] = ()  # among DEVICES

    def labels(self) -> dict[str, int]:
        found = {"cardiomegaly"} if self.cardiomegaly else set()
        found |= {f"effusion_{side}" for side in self.effusion}
        if self.pneumothorax:
            found.add(f"pneumothorax_{self.pneumothorax}")
        if self.nodule:
            found.add(f"nodule_{self.nodule[0]}_{self.nodule[1]}")
        if self.consolidation:
            found.add(f"consolidation_{self.consolidation[0]}_{self.consolidation[1]}")
        found |= {f"{kind}_{side}" for kind, side in (
            ("atelectasis", self.atelectasis), ("opacity", self.opacity),
            ("fracture", self.fracture)) if side}
        found |= {name for name, on in (("enlarged_cardiomediastinum", self.mediastinum),
                                        ("edema", self.edema)) if on}
        found |= {f"devices_{device}" for device in self.devices}
        labels = {name: int(name in found) for name in FINDINGS}
        labels["no_finding"] = int(not found)
        return labels


def sample_study(rng: np.random.Generator, version: int = 1) -> Study:
    """Draw one study's findings. Version 2: about 25% normal, otherwise one to three of the
    eleven kinds; version 1: about 30% normal, otherwise one to three of the first five."""
    normal, counts, kinds_of = (0.3, [0.5, 0.35, 0.15], KINDS[:5]) if version == 1 else \
        (0.25, [0.35, 0.4, 0.25], KINDS)
    if rng.random() < normal:
        return Study(False, (), None, None, None)
    k = int(rng.choice([1, 2, 3], p=counts))
    kinds = set(rng.choice(kinds_of, k, replace=False))
    effusion: tuple[str, ...] = ()
    if "effusion" in kinds:
        effusion = SIDES if rng.random() < 0.2 else (str(rng.choice(SIDES)),)
    ptx_sides = [s for s in SIDES if s not in effusion]
    ptx = str(rng.choice(ptx_sides)) if "ptx" in kinds and ptx_sides else None
    nodule = None
    if "nodule" in kinds:
        size = int(rng.integers(30, 55)) if rng.random() < 0.25 else int(rng.integers(6, 25))
        nodule = (str(rng.choice(SIDES)), str(rng.choice(ZONES)), size)
    consolidation = None
    if "consol" in kinds:
        choices = [(s, z) for s in SIDES for z in ZONES if not nodule or (s, z) != nodule[:2]]
        consolidation = choices[int(rng.integers(len(choices)))]
    sizes = [str(s) for s in rng.choice(list(_SEVERITY), 2)]
    if version == 1:
        return Study("cardio" in kinds, effusion, ptx, nodule, consolidation, *sizes)
    sided = {kind: str(rng.choice(SIDES)) if kind in kinds else None
             for kind in ("atelectasis", "opacity", "fracture")}
    devices: tuple[str, ...] = ()
    if "devices" in kinds:
        picked = rng.choice(len(DEVICES), int(rng.choice([1, 2], p=[0.7, 0.3])), replace=False)
        devices = tuple(DEVICES[i] for i in sorted(picked))
    return Study("cardio" in kinds, effusion, ptx, nodule, consolidation, *sizes,
                 mediastinum="mediastinum" in kinds, edema="edema" in kinds, devices=devices,
                 **sided)


# ----------------------------------------------------------------------------- reports
_HEART_POS = ["The heart is enlarged.", "The heart is mildly enlarged.",
              "Cardiomegaly is present.", "There is moderate cardiomegaly.",
              "The cardiac silhouette is enlarged.", "Heart size is enlarged.",
              "Enlarged cardiac silhouette."]
_HEART_NEG = ["The heart is normal in size.", "Heart size is within normal limits.",
              "The cardiac silhouette is normal.", "Normal heart size.",
              "The heart is not enlarged.", "No cardiomegaly.",
              "The cardiomediastinal silhouette is within normal limits."]
_MEDIASTINUM = ["The mediastinum is unremarkable.", "Mediastinal contours are normal.",
                "The mediastinal silhouette is within normal limits.",
                "Normal mediastinal contour."]
_BONES = ["No acute osseous abnormality.", "The osseous structures are intact.",
          "Visualized osseous structures are unremarkable.",
          "Mild degenerative changes of the thoracic spine.", "No acute bony abnormality."]
_LUNGS_CLEAR = ["The lungs are clear.", "Lungs are clear bilaterally.",
                "No focal consolidation or suspicious pulmonary nodule.",
                "There is no focal airspace disease.", "The lungs are well expanded and clear."]
_NO_CONSOLIDATION = ["No focal consolidation.", "There is no focal airspace consolidation.",
                     "No focal airspace disease."]
_NO_NODULE = ["No suspicious pulmonary nodules.", "No nodules or masses are seen."]
_PLEURA_CLEAR = ["No pleural effusion or pneumothorax.",
                 "There is no pleural effusion or pneumothorax.",
                 "No evidence of pneumothorax or pleural effusion.",
                 "The costophrenic angles are sharp. No pneumothorax."]
_NO_PTX = ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."]
_NO_EFFUSION = ["No pleural effusion.", "There is no pleural effusion.",
                "The costophrenic angles are sharp."]
_EFFUSION = ["There is a {size} {side} pleural effusion.", "{Size} {side} pleural effusion.",
             "Blunting of the {side} costophrenic angle consistent with a {size} effusion.",
             "A {size} pleural effusion is present on the {side}.",
             "Blunting of the {side} costophrenic angle with a meniscus, consistent with "
             "pleural effusion."]
_EFFUSION_BOTH = ["There are {size} bilateral pleural effusions.",
                  "{Size} bilateral pleural effusions.",
                  "Bilateral pleural effusions with blunting of both costophrenic angles."]
_PTX = ["There is a {size} {side} pneumothorax.",
        "{Side} apical pneumothorax with a visible pleural line.",
        "A {size} {side} pneumothorax is present.",
        "Pneumothorax on the {side} with a visible visceral pleural line."]
_NODULE = ["There is a {mm} mm nodule in the {loc}.",
           "A {cm} cm nodular opacity projects over the {loc}.",
           "{Loc} pulmonary nodule measuring {mm} mm.",
           "Rounded opacity in the {loc}, likely a nodule."]
_MASS = ["There is a {cm} cm mass in the {loc}.", "{Loc} mass measuring {cm} cm.",
         "A large {cm} cm mass occupies the {loc}."]
_CONSOL = ["There is focal consolidation in the {loc}.",
           "Patchy consolidation is seen in the {loc}.",
           "Airspace opacity in the {loc}, consistent with consolidation.",
           "{Loc} consolidation.",
           "Focal airspace disease in the {loc}, compatible with pneumonia."]
_MEDIASTINUM_WIDE = ["The mediastinum is widened.", "Widened superior mediastinum.",
                     "The mediastinal silhouette is widened.",
                     "Widening of the superior mediastinum."]
_ATELECTASIS = ["{Side} basilar atelectasis.", "Linear atelectasis at the {side} base.",
                "Plate-like atelectasis in the {side} lower zone.",
                "Subsegmental atelectasis at the {side} base."]
_OPACITY = ["Hazy opacity over the {side} lung.", "There is ill-defined opacity in the {side} lung.",
            "Ground-glass opacity in the {side} mid and lower lung."]
_FRACTURE = ["Healing fracture of a {side} lateral rib.", "There is a healed {side} rib fracture.",
             "{Side} lateral rib fracture with callus formation.",
             "Old fracture of a {side} lateral rib."]
_EDEMA = ["Mild pulmonary edema.", "There is mild interstitial pulmonary edema.",
          "Perihilar haziness consistent with pulmonary edema.",
          "Bilateral perihilar opacities consistent with mild pulmonary edema."]
_NO_EDEMA = ["No pulmonary edema.", "There is no pulmonary edema."]
_DEVICE = {"tube": ["Endotracheal tube with tip {cm} cm above the carina.",
                    "An endotracheal tube is in place."],
           "line": ["Right internal jugular central venous catheter with tip in the SVC.",
                    "A right-sided central line terminates in the superior vena cava."],
           "pacemaker": ["Left chest wall pacemaker with leads in the right heart.",
                         "A dual-lead pacemaker projects over the left chest."]}
# Hedged wording: the finding is drawn, the report is not sure of it (uncertain in CheXpert).
_HEDGED = {
    "cardio": ["The heart size is borderline enlarged.", "Possible mild cardiomegaly."],
    "effusion": ["Possible {size} {side} pleural effusion.",
                 "A {size} {side} pleural effusion cannot be excluded."],
    "ptx": ["Possible {size} {side} apical pneumothorax.",
            "A {size} {side} pneumothorax cannot be excluded."],
    "nodule": ["Possible {mm} mm nodule in the {loc}.",
               "Rounded density in the {loc} may represent a nodule."],
    "consol": ["Patchy density in the {loc}, cannot exclude pneumonia.",
               "Airspace opacity in the {loc} may represent pneumonia."],
    "mediastinum": ["The mediastinum appears mildly widened, possibly due to projection."],
    "atelectasis": ["Streaky {side} basilar density, likely atelectasis.",
                    "{Side} basilar density may represent atelectasis."],
    "opacity": ["Possible hazy opacity in the {side} lung.",
                "Questionable ill-defined opacity in the {side} lung."],
    "fracture": ["Possible nondisplaced fracture of a {side} lateral rib.",
                 "Irregularity of a {side} lateral rib may represent a healing fracture."],
    "edema": ["Perihilar haziness may represent mild pulmonary edema.",
              "Findings may reflect mild pulmonary edema."],
}
HEDGE_SHARE = 0.2
_IMPRESSION_NORMAL = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary disease.",
                      "Normal chest radiograph.", "No active disease."]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, **values: str) -> str:
    values.update({k.capitalize(): v.capitalize() for k, v in values.items()})
    return template.format(**values)


def _location(rng: np.random.Generator, side: str, zone: str) -> str:
    if zone == "middle" and side == "left" and rng.random() < 0.3:
        return "lingula"
    if rng.random() < 0.3:
        return f"{side} {zone} lobe" if zone != "middle" or side == "right" else f"{side} mid zone"
    return f"{side} {_pick(rng, [zone, zone, 'mid'] if zone == 'middle' else [zone])} zone"


def _positive_sentences(study: Study, rng: np.random.Generator, hedge: float
                        ) -> tuple[list[str], list[str]]:
    """(findings sentences, impression sentences) for the abnormal findings."""
    found, impression = [], []

    def say(kind: str, options: list[str], summary: str | None, **values: str) -> None:
        hedged = kind in _HEDGED and hedge > 0 and rng.random() < hedge
        found.append(_fill(_pick(rng, _HEDGED[kind] if hedged else options), **values))
        if summary:
            summary = _fill(summary, **values)
            impression.append(f"Possible {summary[0].lower()}{summary[1:]}" if hedged
                              else summary)

    if study.cardiomegaly:
        say("cardio", _HEART_POS, _pick(rng, ["Cardiomegaly.", "Enlarged heart."]))
    if study.mediastinum:
        say("mediastinum", _MEDIASTINUM_WIDE, "Widened mediastinum.")
    if len(study.effusion) == 2:
        found.append(_fill(_pick(rng, _EFFUSION_BOTH), size=study.effusion_size))
        impression.append("Bilateral pleural effusions.")
    elif study.effusion:
        say("effusion", _EFFUSION, "{Side} pleural effusion.", size=study.effusion_size,
            side=study.effusion[0])
    if study.pneumothorax:
        say("ptx", _PTX, "{Side} pneumothorax.", size=study.pneumothorax_size,
            side=study.pneumothorax)
    if study.nodule:
        side, zone, mm = study.nodule
        loc = _location(rng, side, zone)
        what = "mass" if mm >= 30 else "nodule"
        say("nodule" if what == "nodule" else "mass", _MASS if mm >= 30 else _NODULE,
            f"{{Loc}} {what}; CT is recommended.", loc=loc, mm=str(mm), cm=f"{mm / 10:.1f}")
    if study.consolidation:
        say("consol", _CONSOL, "{Loc} consolidation, likely pneumonia.",
            loc=_location(rng, *study.consolidation))
    if study.atelectasis:
        say("atelectasis", _ATELECTASIS, "{Side} basilar atelectasis.", side=study.atelectasis)
    if study.opacity:
        say("opacity", _OPACITY, None, side=study.opacity)
    if study.edema:
        say("edema", _EDEMA, "Pulmonary edema.")
    if study.fracture:
        say("fracture", _FRACTURE, "{Side} rib fracture.", side=study.fracture)
    for device in study.devices:
        found.append(_fill(_pick(rng, _DEVICE[device]), cm=str(int(rng.integers(3, 6)))))
    return found, impression


def write_report(study: Study, rng: np.random.Generator, version: int = 1) -> str:
    """An IU X-Ray style report of 20-90 words that states every finding and negates the rest
    (version 1: never hedged, edema never mentioned)."""
    for _ in range(20):
        found, impression = _positive_sentences(study, rng, HEDGE_SHARE if version > 1 else 0)
        groups = [[sentence] for sentence in found]
        if not study.cardiomegaly:
            groups.append([_pick(rng, _HEART_NEG[:-1] if study.mediastinum else _HEART_NEG)])
        if not study.mediastinum and rng.random() < 0.6:
            groups.append([_pick(rng, _MEDIASTINUM)])
        if not study.nodule and not study.consolidation:
            groups.append([_pick(rng, _LUNGS_CLEAR)])
        elif not (study.nodule and study.consolidation) and rng.random() < 0.7:
            groups.append([_pick(rng, _NO_NODULE if study.consolidation else _NO_CONSOLIDATION)])
        if not study.effusion and not study.pneumothorax:
            groups.append([_pick(rng, _PLEURA_CLEAR)])
        elif not study.pneumothorax:
            groups.append([_pick(rng, _NO_PTX)])
        elif not study.effusion:
            groups.append([_pick(rng, _NO_EFFUSION)])
        if version > 1 and not study.edema and rng.random() < 0.25:
            groups.append([_pick(rng, _NO_EDEMA)])
        if not study.fracture and rng.random() < 0.6:
            groups.append([_pick(rng, _BONES)])
        sentences = [s for i in rng.permutation(len(groups)) for s in groups[i]]
        sentences += impression[:2] if impression else [_pick(rng, _IMPRESSION_NORMAL)]
        report = " ".join(sentences)
        if 20 <= len(report.split()) <= 90:
            return report
    raise RuntimeError(f"no report of 20-90 words for {study}")  # never seen; a template bug


# ----------------------------------------------------------------------------- images
# Drawing happens in float32 "body" coordinates (u to the image right, v down, about [-1, 1]);
# each study's pose (scale, shift, rotation) maps pixels into them.
def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))  # a Python float keeps the arrays float32


def _ellipse(u, v, cu, cv, ru, rv):
    """Normalised radius: < 1 inside the ellipse."""
    return np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)


def _soft(x, sharpness: float = 25.0):
    """Soft step, 1 where x < 0 and 0 where x > 0; soft edges avoid aliasing at any size."""
    return 0.5 - 0.5 * np.tanh(x * (sharpness / 2))


def _lung(u, v, side: str, geom: dict):
    sign = -1.0 if side == "right" else 1.0  # patient right is on the image left
    cu, ru = sign * geom["lung_u"], geom["lung_ru"]
    dome = geom["dome_" + side] + 0.16 * ((u - cu) / ru) ** 2
    inside = _soft(_ellipse(u, v, cu, -0.05, ru, geom["lung_rv"]) - 1) * _soft(v - dome, 40)
    return inside, cu, dome


def _markings(u, v, hilum_u: float, rng: np.random.Generator):
    """Vessel-like streaks radiating from each hilum, fading towards the periphery."""
    du = u - np.sign(u) * hilum_u
    theta, radius = np.arctan2(v, du), np.sqrt(du * du + v * v)
    streaks = np.zeros_like(u)
    for _ in range(3):
        freq, phase, twist = int(rng.integers(10, 24)), _uniform(rng, 0, 6.3), _uniform(rng, -9, 9)
        streaks += np.cos(freq * theta + (phase + twist * radius))
    return np.maximum(streaks * (1 / 3), 0) * np.exp(radius * -2.5)


def _ribs(u, v, rng: np.random.Generator):
    """Posterior ribs as periodic arcs: one pass instead of one per rib."""
    spacing, count = _uniform(rng, 0.11, 0.13), int(rng.integers(8, 11))
    au = np.abs(u)
    arch = _uniform(rng, 0.9, 1.3)
    phase = (v + 0.62 - arch * (au - 0.45) ** 2 - 0.15 * au) / spacing
    offset = (phase - np.round(phase)) * (spacing / 0.03)
    keep = (phase > -0.5) & (phase < count - 0.5)
    return _uniform(rng, 0.04, 0.08) * np.exp(-offset * offset) * keep * _soft(au - 0.8, 20)


def _zone_point(rng, side: str, zone: str, geom: dict) -> tuple[float, float]:
    sign = -1.0 if side == "right" else 1.0
    top, bottom = -0.05 - geom["lung_rv"] * 0.85, geom["dome_" + side] - 0.02
    third = (bottom - top) / 3
    v = top + third * (ZONES.index(zone) + _uniform(rng, 0.3, 0.7))
    u = sign * (geom["lung_u"] + _uniform(rng, -0.35, 0.35) * geom["lung_ru"])
    return u, v


def _draw_findings(img, u, v, study: Study, lungs: dict, geom: dict, rng):
    """Paint pathology onto the normal film, in place."""
    for side in study.effusion:  # basal opacity climbing laterally: a blunted angle
        inside, cu, _ = lungs[side]
        lateral = np.minimum(np.abs(u - cu * 0.4) / geom["lung_ru"], 1.5)
        level = geom["dome_" + side] - _uniform(rng, *_SEVERITY[study.effusion_size][0]) * (
            0.5 + 0.7 * lateral)
        img += inside * _soft(level - v, 30) * (0.55 - img)
    if study.pneumothorax:  # collapsed lung, air rim without markings, pleural line
        inside, cu, _ = lungs[study.pneumothorax]
        shrink = _uniform(rng, *_SEVERITY[study.pneumothorax_size][1])
        ru, rv = geom["lung_ru"], geom["lung_rv"]
        # shrunk towards the hilum and base, so the air rim is lateral and apical
        r = _ellipse(u, v, cu - np.sign(cu) * (1 - shrink) * ru, -0.05 + (1 - shrink) * rv,
                     ru * shrink, rv * shrink)
        img += inside * (1 - _soft(r - 1)) * (0.05 - img)
        img += 0.18 * inside * np.exp(-((r - 1) / 0.02) ** 2)
    if study.nodule:
        side, zone, mm = study.nodule
        cu, cv = _zone_point(rng, side, zone, geom)
        radius = mm / 300 * _uniform(rng, 0.9, 1.1)
        img += 0.35 * _soft(_ellipse(u, v, cu, cv, radius, radius * _uniform(rng, 0.8, 1.2)) - 1, 8)
    if study.consolidation:  # patchy opacity confined to the lung
        side, zone = study.consolidation
        cu, cv = _zone_point(rng, side, zone, geom)
        spread = _uniform(rng, 0.1, 0.16)
        blob = np.exp(-(((u - cu) / (spread * 1.2)) ** 2 + ((v - cv) / spread) ** 2))
        patchy = 0.6 + 0.4 * np.cos(_uniform(rng, 20, 35) * u + _uniform(rng, 0, 6)) * np.cos(
            _uniform(rng, 20, 35) * v + _uniform(rng, 0, 6))
        img += 0.4 * blob * patchy * lungs[side][0]
    if study.atelectasis:  # a dense plate-like band above the dome, a little oblique
        inside, cu, _ = lungs[study.atelectasis]
        level = geom["dome_" + study.atelectasis] - _uniform(rng, 0.02, 0.1) + _uniform(
            rng, -0.12, 0.12) * (u - cu)
        band = np.exp(-((v - level) / _uniform(rng, 0.025, 0.035)) ** 2)
        img += 0.4 * band * inside * _soft(np.abs(u - cu) - geom["lung_ru"] * 0.75, 15)
    if study.opacity:  # a faint haze over one lung, thicker towards the base
        inside, _, _ = lungs[study.opacity]
        img += _uniform(rng, 0.2, 0.26) * inside * np.clip((v + 0.6) / 0.9, 0.4, 1.0)
    if study.edema:  # bilateral perihilar (bat-wing) haze
        for side in SIDES:
            inside, cu, _ = lungs[side]
            hilum = cu * 0.55
            haze = np.exp(-(((u - hilum) / 0.22) ** 2 + ((v - 0.02) / 0.3) ** 2))
            img += _uniform(rng, 0.22, 0.3) * haze * inside
    if study.fracture:  # a bright callus on a lateral rib, with a dark cleft through it
        sign = -1.0 if study.fracture == "right" else 1.0
        cu = sign * (geom["lung_u"] + geom["lung_ru"] * _uniform(rng, 0.7, 0.85))
        cv = _uniform(rng, -0.35, 0.15)
        callus = _soft(_ellipse(u, v, cu, cv, 0.05, 0.035) - 1, 10)
        cleft = np.exp(-((u - cu) / 0.008) ** 2) * (np.abs(v - cv) < 0.03)
        img += 0.35 * callus - 0.25 * cleft
    for device in study.devices:  # metal and tubing: the brightest things on the film
        if device == "tube":  # endotracheal tube down the midline to above the carina
            tip = _uniform(rng, -0.45, -0.35)
            img += (0.9 - img) * np.exp(-(u / 0.012) ** 2) * _soft(v - tip, 40)
        elif device == "line":  # right jugular line curving into the superior vena cava
            tip = _uniform(rng, -0.25, -0.1)
            path = -0.06 - 0.25 * np.clip((tip - v) / (tip + 1.0), 0, 1) ** 2
            img += (0.85 - img) * np.exp(-((u - path) / 0.01) ** 2) * _soft(v - tip, 40)
        else:  # pacemaker can over the left upper chest, a lead running to the heart
            cu, cv = _uniform(rng, 0.45, 0.55), _uniform(rng, -0.7, -0.55)
            img += (0.95 - img) * _soft(np.maximum(np.abs(u - cu) / 0.09,
                                                   np.abs(v - cv) / 0.06) - 1, 20)
            t = np.clip((v - cv) / (0.25 - cv), 0, 1)
            lead = cu + (0.05 - cu) * t
            img += (0.85 - img) * np.exp(-((u - lead) / 0.008) ** 2) * (v > cv) * (v < 0.25)


def draw_study(study: Study, size: int, rng: np.random.Generator) -> np.ndarray:
    """A `size` x `size` uint8 PA radiograph showing the study's findings."""
    scale, angle = _uniform(rng, 0.9, 1.08), np.deg2rad(_uniform(rng, -6, 6))
    cos, sin = float(np.cos(angle)) / scale, float(np.sin(angle)) / scale
    axis = (np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1
    x, y = np.meshgrid(axis - _uniform(rng, -0.06, 0.06), axis - _uniform(rng, -0.06, 0.06))
    u, v = cos * x + sin * y, cos * y - sin * x
    geom = {"lung_u": _uniform(rng, 0.36, 0.44), "lung_ru": _uniform(rng, 0.26, 0.32),
            "lung_rv": _uniform(rng, 0.55, 0.65), "dome_right": _uniform(rng, 0.38, 0.46),
            "dome_left": _uniform(rng, 0.44, 0.52)}
    body = _soft(_ellipse(u, v, 0, 0.15, 0.95, 1.2) - 1, 15)
    img = 0.03 + 0.37 * body + 0.12 * body * _soft(0.5 - v, 10)  # brighter abdomen below domes
    lungs = {side: _lung(u, v, side, geom) for side in SIDES}
    lung_tone = 0.13 + 0.12 * _markings(u, v, geom["lung_u"] * 0.45, rng)
    for inside, _, _ in lungs.values():
        img += inside * (lung_tone - img)
    img += _ribs(u, v, rng)
    clavicles = np.exp(-((v + 0.68 - 0.18 * np.abs(u)) / 0.03) ** 2) * (np.abs(u) < 0.55)
    img += 0.12 * clavicles
    width = _uniform(rng, 0.1, 0.13)
    if study.mediastinum:  # the upper mediastinum widened, above the heart
        width = width * (1 + _uniform(rng, 1.3, 1.7) * _soft(v - 0.05, 12))
    img += (0.55 - img) * _soft(np.abs(u) / width - 1, 6)  # mediastinum
    normal_ru, enlarged_ru = _uniform(rng, 0.27, 0.33), _uniform(rng, 0.42, 0.5)
    heart_ru = enlarged_ru if study.cardiomegaly else normal_ru
    img += _soft(_ellipse(u, v, 0.1, 0.3, heart_ru, 0.26) - 1, 12) * (0.58 - img)
    # Pathology draws from its own stream, so the same patient with and without a finding
    # differs only where the finding is.
    _draw_findings(img, u, v, study, lungs, geom, rng.spawn(1)[0])
    gamma, contrast = _uniform(rng, 0.8, 1.25), _uniform(rng, 0.85, 1.15)
    img = np.clip(img * contrast + _uniform(rng, -0.05, 0.05), 0, 1) ** gamma
    img += rng.standard_normal(img.shape, dtype=np.float32) * _uniform(rng, 0.01, 0.03)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- writing
def _meta(seed: int, n_train: int, n_val: int, n_test: int, image_size: int,
          version: int) -> dict:
    return {"generator": "pipeline.data.synthetic", "version": version, "seed": seed,
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size,
            "labels": len(FINDINGS)}


def _is_complete(out: Path, meta: dict) -> bool:
    try:
        stored = json.loads((out / META_NAME).read_text(encoding="utf-8"))
        annotation = (out / "annotation.json").read_bytes()
    except (OSError, ValueError):
        return False
    if stored.get("annotation_sha256") != hashlib.sha256(annotation).hexdigest():
        return False
    if {k: stored.get(k) for k in meta} != meta:
        return False
    entries = [e for split in json.loads(annotation).values() for e in split]
    return all((out / "images" / p).is_file() for e in entries for p in e["image_path"])


def generate_synthetic(out_dir: str | Path, seed: int = 0, n_train: int = 254, n_val: int = 32,
                       n_test: int = 64, image_size: int = 224, version: int = 1) -> Path:
    """Write the benchmark under `out_dir` (skipped if already there); return annotation.json.

    Written into a temporary folder beside `out_dir` and renamed into place once complete, so
    two first runs never write into one folder and a stopped run leaves nothing half-written.
    """
    out = Path(out_dir)
    meta = _meta(seed, n_train, n_val, n_test, image_size, version)
    if _is_complete(out, meta):
        return out / "annotation.json"
    if min(n_train, n_val, n_test) < 0 or image_size < 16 or version not in VERSIONS:
        raise ConfigError(f"need split sizes >= 0, image_size >= 16 and a version in "
                          f"{VERSIONS}, got {meta}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write(staging, meta, seed, n_train, n_val, n_test, image_size, version)
        _install(staging, out, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "annotation.json"


def _install(staging: Path, out: Path, meta: dict) -> None:
    """Rename the finished `staging` folder to `out`; an earlier incomplete `out` (ours: only
    our files in it) is moved aside first; one that another run completed meanwhile is kept."""
    for _ in range(10):  # each try loses only to another run that moved `out` meanwhile
        try:
            os.rename(staging, out)  # atomic; fails while `out` exists and is not empty
            return
        except OSError:
            if _is_complete(out, meta):
                return
            if not out.is_dir():
                if out.exists():
                    raise
                continue
            if set(os.listdir(out)) - {"annotation.json", "images", META_NAME}:
                raise ConfigError(f"{out} holds files other than a synthetic set; choose an "
                                  "empty or new folder")
            stale = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stale-"))
            try:
                os.rename(out, stale / "set")
            except FileNotFoundError:  # another run moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise ConfigError(f"could not put the synthetic set in place at {out}")


def _write(out: Path, meta: dict, seed: int, n_train: int, n_val: int, n_test: int,
           image_size: int, version: int) -> None:
    counts = {"train": n_train, "val": n_val, "test": n_test}
    annotation: dict[str, list] = {split: [] for split in counts}
    index = 0
    for split, count in counts.items():
        for _ in range(count):
            rng = np.random.default_rng([seed, index])  # per study: stable under other sizes
            study = sample_study(rng, version)
            report = write_report(study, rng, version)
            study_id = f"SYN-{index:05d}"
            path = out / "images" / study_id / "0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_study(study, image_size, rng)).save(
                path, format="PNG", compress_level=1)
            annotation[split].append({"id": study_id, "report": report,
                                      "image_path": [f"{study_id}/0.png"],
                                      "labels": study.labels()})
            index += 1
    text = json.dumps(annotation, indent=1) + "\n"
    (out / "annotation.json").write_text(text, encoding="utf-8")
    meta = {**meta, "annotation_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    meta_text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    (out / META_NAME).write_text(meta_text, encoding="utf-8")


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write annotation.json and images/ into.")
@click.option("--seed", default=0, show_default=True, help="Seed of the whole set.")
@click.option("--n-train", default=254, show_default=True, help="Number of training studies.")
@click.option("--n-val", default=32, show_default=True, help="Number of validation studies.")
@click.option("--n-test", default=64, show_default=True, help="Number of test studies.")
@click.option("--image-size", default=224, show_default=True, help="Side of the square PNGs.")
@click.option("--version", default=1, show_default=True, type=click.Choice(["1", "2"]),
              help="1: five finding kinds; 2: eleven of CheXpert's observations, hedged.")
def main(out_dir: str, seed: int, n_train: int, n_val: int, n_test: int, image_size: int,
         version: str) -> None:
    """Generate the synthetic benchmark."""
    path = generate_synthetic(out_dir, seed, n_train, n_val, n_test, image_size, int(version))
    click.echo(str(path))


if __name__ == "__main__":
    main()
