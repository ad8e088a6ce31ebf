"""Raw releases -> the R2Gen layout that `load_records` reads (`annotation.json` + `images/`).

- IU X-Ray (Open-i's `ecgen-radiology` XML reports and `NLMCXR_png` films): the report is the
  FINDINGS section (optionally the IMPRESSION when the findings are empty); a study's views
  are the films its `parentImage` elements name, in the file's order, the first `min_views`
  kept (R2Gen's annotation has two, `0.png` and `1.png`; the XML does not say which film is
  frontal); studies are split 7:1:2 by a seeded shuffle of their sorted ids, R2Gen's rule
  (2955 studies give R2Gen's 2069/296/590). The id is the first film's name without its last
  `-NNNN` (`CXR1_1_IM-0001`), as in R2Gen's file.
- MIMIC-CXR (the report files `files/p10/p10000032/s50414267.txt`, the JPG release's
  `mimic-cxr-2.0.0-metadata.csv` and `mimic-cxr-2.0.0-split.csv`): the findings section as
  MIMIC-CXR's section parser extracts it (`report_sections`), one frontal film (PA before AP)
  and one lateral (LATERAL, LL) per study, the official split (`validate` is `val`).

Studies that cannot be used are left out with their reason (no findings, no image, one view,
...), never silently: `left_out.csv` lists each, and the summary counts them. Report text is
kept as written, whitespace collapsed to single spaces.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data.chexpert import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, label_chexpert
from pipeline.data.dataset import SPLITS, DataError
from pipeline.data.report_sections import findings_section, section

FALLBACKS = ("none", "impression")
IMAGE_MODES = ("link", "copy", "none")
FRONTAL, LATERAL = ("PA", "AP"), ("LATERAL", "LL")
_OFFICIAL_SPLIT = {"train": "train", "validate": "val", "val": "val", "test": "test"}


@dataclass(frozen=True)
class Study:
    """One usable study: its id, report, views (relative to the image root) and split."""

    id: str
    report: str
    image_path: tuple[str, ...]
    split: str
    extra: dict = field(default_factory=dict, compare=False)  # release ids kept beside

    def entry(self) -> dict:
        return {"id": self.id, **self.extra, "report": self.report,
                "image_path": list(self.image_path), "split": self.split}


@dataclass(frozen=True)
class Prepared:
    """A release read into studies, the studies left out ({id, reason, source, optional
    detail}), and the folder the views' paths are relative to."""

    dataset: str
    studies: list[Study]
    left_out: list[dict]
    image_root: Path


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _report(findings: str, impression: str, fallback: str) -> tuple[str, str]:
    """(report, "") or ("", the reason it has none)."""
    if findings:
        return findings, ""
    if fallback == "impression":
        return (impression, "") if impression else ("", "no findings or impression")
    return "", "no findings"


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise DataError(f"{what} must be one of {list(choices)}, got {value!r}")


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder")
    return path


# ---------------------------------------------------------------------------- IU X-Ray
def read_iu_xml(path: Path) -> tuple[dict[str, str], list[str]]:
    """({section label, lower case: text}, [film ids]) of one Open-i XML report."""
    root = ET.parse(path).getroot()
    sections = {(node.get("Label") or "").lower(): _one_line(node.text)
                for node in root.iterfind("MedlineCitation/Article/Abstract/AbstractText")}
    return sections, [node.get("id") for node in root.iterfind("parentImage") if node.get("id")]


def r2gen_split(ids: list[str], seed: int) -> dict[str, str]:
    """R2Gen's rule: 7:1:2 train/val/test by a seeded shuffle (of the sorted ids, so the result
    depends only on the set and the seed). Counts round half up: 2955 -> 2069/296/590."""
    ordered = sorted(ids)
    order = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    n_train, n_val = (7 * len(ids) + 5) // 10, (len(ids) + 5) // 10
    return {study: "train" if i < n_train else "val" if i < n_train + n_val else "test"
            for i, study in enumerate(order)}


def prepare_iu_xray(reports: str | Path, images: str | Path, *, fallback: str = "none",
                    min_views: int = 2, seed: int = 0) -> Prepared:
    """Read Open-i's IU X-Ray release (see module docstring)."""
    _check_choice(fallback, FALLBACKS, "fallback")
    if min_views < 1:
        raise DataError(f"min_views must be at least 1, got {min_views}")
    reports, images = _folder(reports, "reports"), _folder(images, "images")
    files = sorted(reports.glob("*.xml"))
    if not files:
        raise DataError(f"reports {reports} holds no .xml report")
    films = {p.stem for p in images.glob("*.png")}
    kept: list[tuple[str, str, tuple[str, ...], str]] = []
    left_out: list[dict] = []
    for path in tqdm(files, desc="IU X-Ray reports", unit="report", leave=False):
        try:
            sections, image_ids = read_iu_xml(path)
        except ET.ParseError as exc:
            left_out.append({"id": path.stem, "reason": "unreadable XML", "source": path.name,
                             "detail": str(exc)})
            continue
        study_id = re.sub(r"-\d+$", "", image_ids[0]) if image_ids else path.stem
        views = tuple(f"{i}.png" for i in image_ids if i in films)[:min_views]
        report, reason = _report(sections.get("findings", ""), sections.get("impression", ""),
                                 fallback)
        if not reason and not views:
            reason = "no image" if not image_ids else "no image file found"
        elif not reason and len(views) < min_views:
            reason = f"{len(views)} view(s), {min_views} needed"
        if reason:
            left_out.append({"id": study_id, "reason": reason, "source": path.name})
        else:
            kept.append((study_id, report, views, path.name))
    duplicates = [sid for sid, n in Counter(s[0] for s in kept).items() if n > 1]
    if duplicates:
        raise DataError(f"studies named by more than one report: {duplicates[:10]}")
    split = r2gen_split([s[0] for s in kept], seed)
    studies = [Study(sid, report, views, split[sid], {"source": source})
               for sid, report, views, source in sorted(kept)]
    return Prepared("iu-xray", studies, left_out, images.resolve())


# ---------------------------------------------------------------------------- MIMIC-CXR
def _files_root(path: Path) -> Path:
    """The release's `files/` folder when `path` is the folder above it."""
    return path / "files" if (path / "files").is_dir() else path


def _read_csv(path: str | Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} {path} lacks the column(s) {missing}; has {list(frame.columns)}")
    return frame[list(columns)]


def _choose_views(films: pd.DataFrame) -> list[str]:
    """One frontal film (PA before AP) and one lateral (LATERAL before LL), by dicom_id within
    a position; a study with neither keeps its first film."""
    rank = {position: i for i, position in enumerate((*FRONTAL, *LATERAL))}
    films = films.assign(rank=films["ViewPosition"].map(rank).fillna(len(rank)))
    films = films.sort_values(["rank", "dicom_id"])
    frontal = films[films["ViewPosition"].isin(FRONTAL)]
    lateral = films[films["ViewPosition"].isin(LATERAL)]
    chosen = [*frontal["path"][:1], *lateral["path"][:1]]
    return chosen or list(films["path"][:1])


def prepare_mimic_cxr(reports: str | Path, images: str | Path, metadata: str | Path,
                      split: str | Path, *, fallback: str = "none") -> Prepared:
    """Read MIMIC-CXR's report files and MIMIC-CXR-JPG's films and CSVs (module docstring)."""
    _check_choice(fallback, FALLBACKS, "fallback")
    reports = _files_root(_folder(reports, "reports"))
    images = _files_root(_folder(images, "images"))
    meta = _read_csv(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                     "metadata")
    splits = _read_csv(split, ("dicom_id", "split"), "split")
    films = meta.merge(splits, on="dicom_id", how="left").fillna({"split": ""})
    films["path"] = [f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg" for subject, study, dicom
                     in zip(films["subject_id"], films["study_id"], films["dicom_id"])]
    films["exists"] = [os.path.isfile(images / p) for p in
                       tqdm(films["path"], desc="MIMIC-CXR films", unit="film", leave=False)]
    texts = {p.stem[1:]: p for p in reports.rglob("s*.txt")}
    if not texts:
        raise DataError(f"reports {reports} holds no s<study>.txt report")
    by_study = {study: group for study, group in films.groupby("study_id", sort=False)}
    studies, left_out = [], []
    for study in tqdm(sorted(set(texts) | set(by_study)), desc="MIMIC-CXR studies",
                      unit="study", leave=False):
        sid, group = f"s{study}", by_study.get(study)
        source = str(texts[study].relative_to(reports)) if study in texts else ""
        reason, report = "", ""
        if study not in texts:
            reason = "no report"
        else:
            text = texts[study].read_text(encoding="utf-8", errors="replace")
            report, reason = _report(_one_line(findings_section(text)),
                                     _one_line(section(text, "impression")), fallback)
        present = group[group["exists"]] if group is not None else None
        official = sorted(set(group["split"]) - {""}) if group is not None else []
        if not reason and (present is None or present.empty):
            reason = "no image" if group is None else "no image file found"
        elif not reason and len(official) != 1:
            reason = ("not in the split file" if not official
                      else f"films in more than one split ({', '.join(official)})")
        elif not reason and official[0] not in _OFFICIAL_SPLIT:
            reason = f"unknown split {official[0]!r}"
        if reason:
            left_out.append({"id": sid, "reason": reason, "source": source})
            continue
        subject = present["subject_id"].iloc[0]
        studies.append(Study(sid, report, tuple(_choose_views(present)),
                             _OFFICIAL_SPLIT[official[0]],
                             {"study_id": int(study), "subject_id": int(subject)}))
    return Prepared("mimic-cxr", studies, left_out, images.resolve())


# ---------------------------------------------------------------------------- writing
def label_distribution(reports: list[str]) -> dict[str, dict[str, int]]:
    """{observation: {positive, uncertain, negative}} counted over `reports` by
    `label_chexpert` (a report that does not mention an observation counts in none)."""
    counts = {name: dict.fromkeys(("positive", "uncertain", "negative"), 0)
              for name in OBSERVATIONS}
    words = {POSITIVE: "positive", UNCERTAIN: "uncertain", NEGATIVE: "negative"}
    for report in tqdm(reports, desc="labelling", unit="report", leave=False):
        for name, status in label_chexpert(report).items():
            if status is not None:
                counts[name][words[status]] += 1
    return counts


def summarize(prepared: Prepared) -> dict:
    """Studies per split, studies left out per reason, and the kept reports' labels."""
    return {"dataset": prepared.dataset,
            "studies": {s: sum(x.split == s for x in prepared.studies) for s in SPLITS},
            "left_out": dict(Counter(x["reason"] for x in prepared.left_out).most_common()),
            "labels": label_distribution([s.report for s in prepared.studies])}


def format_summary(summary: dict, out: Path) -> str:
    """The summary as the prepare command prints it."""
    studies, dropped = summary["studies"], summary["left_out"]
    lines = [f"{summary['dataset']} -> {out / 'annotation.json'}",
             f"studies: {sum(studies.values())} ("
             + ", ".join(f"{s} {n}" for s, n in studies.items()) + ")",
             f"left out: {sum(dropped.values())} (listed in {out / 'left_out.csv'})"]
    lines += [f"  {reason}: {n}" for reason, n in dropped.items()]
    lines.append("labels by label_chexpert (positive / uncertain / negative reports):")
    lines += [f"  {name:<27} {c['positive']:>6} / {c['uncertain']:>6} / {c['negative']:>6}"
              for name, c in summary["labels"].items()]
    return "\n".join(lines)


def _place_images(prepared: Prepared, out: Path, mode: str) -> None:
    target = out / "images"
    if mode == "none":
        return
    if target.is_symlink():
        target.unlink()
    elif target.exists() and mode == "link":
        raise DataError(f"{target} exists and is not a link; remove it or use images=copy")
    if mode == "link":
        target.symlink_to(prepared.image_root, target_is_directory=True)
        return
    for study in tqdm(prepared.studies, desc="copying films", unit="study", leave=False):
        for path in study.image_path:
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(prepared.image_root / path, target / path)


def write_prepared(prepared: Prepared, out: str | Path, images: str = "link") -> dict:
    """Write `annotation.json`, `left_out.csv`, `prepare_summary.json` and `images/` (a link
    to the release's image folder, a copy of the films used, or nothing: then pass
    `image_dir`) into `out`; return the summary."""
    _check_choice(images, IMAGE_MODES, "images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    annotation = {s: [x.entry() for x in prepared.studies if x.split == s] for s in SPLITS}
    (out / "annotation.json").write_text(json.dumps(annotation, indent=1, ensure_ascii=False),
                                         encoding="utf-8")
    pd.DataFrame(prepared.left_out, columns=["id", "reason", "source", "detail"]).to_csv(
        out / "left_out.csv", index=False)
    _place_images(prepared, out, images)
    summary = summarize(prepared)
    (out / "prepare_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
