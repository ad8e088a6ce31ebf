"""Image/report pairs: loaders for R2Gen annotation.json, CSV and JSONL, and the torch Dataset.

Formats (`load_records`):
- R2Gen `annotation.json`: `{"train": [...], "val": [...], "test": [...]}`, entries
  `{id, report, image_path: [views...]}`; other keys (MIMIC's `study_id`, ...) are ignored,
  except `labels` over `FINDINGS`, which is checked and kept (the synthetic set has it).
- CSV / JSONL: columns `image` and `report`, optional `id` and `split`. Several views go in
  one `image` cell separated by ";" (JSONL may also give a list). Without an `id` column the
  id is the image path without its suffix. Without a `split` column every study gets a
  deterministic split from a hash of its id: 80% train, 10% val, 10% test.

Relative image paths resolve against the data file's folder, then against an `images/`
folder beside it (the R2Gen releases: `iu_xray/annotation.json`, `iu_xray/images/<id>/0.png`),
or only against `image_dir` when one is given. A path may not leave that folder; this is
checked on the path's text, so a symlinked `images/` folder still works.

Validation is eager and complete: every entry and every image file (opened and verified) is
checked at load time, all problems are collected, and one `DataError` lists them, each naming
the file and the entry, so a run fails before its first step. Nothing is silently dropped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import DataConfig
from pipeline.data.images import (ImageCache, ImageDecodeError, cache_dir_for, decode_file,
                                  model_input, verify_file)
from pipeline.data.labeler import FINDINGS
from pipeline.data.synthetic import SOURCES as SYNTHETIC_SOURCES, generate_synthetic

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "dev": "val", "test": "test"}
_MAX_LISTED = 20
_MAX_MESSAGE = 1000


class DataError(ValueError):
    """Unusable input data; the message names each offending file and entry."""


@dataclass(frozen=True)
class Record:
    """One study: its report, the absolute paths of its views, its split, optional labels,
    and the folder its data set's decoded films are cached in (None: not cached)."""

    id: str
    report: str
    image_paths: tuple[str, ...]
    split: str
    labels: dict[str, int] | None = None
    image_cache: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Raw:
    where: str  # "train[3]" or "line 7"
    id: Any
    report: Any
    images: Any
    split: str | None
    labels: Any = None


class _Problems:
    """Collects every problem of one data file, then raises them as one DataError."""

    def __init__(self, file: Path):
        self.file, self.lines = file, []

    def add(self, where: str, message: str, entry_id: Any = None) -> None:
        who = f" id={entry_id!r}" if entry_id is not None else ""
        if len(message) > _MAX_MESSAGE:  # a huge value quoted back would bury the others
            message = f"{message[:_MAX_MESSAGE]}... ({len(message)} characters)"
        self.lines.append(f"{self.file}: {where}{who[:_MAX_MESSAGE]}: {message}")

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        shown = "\n  ".join(self.lines[:_MAX_LISTED])
        more = len(self.lines) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(f"{len(self.lines)} problem(s) in {self.file}:\n  {shown}{tail}")


def _kind(value: Any) -> str:
    return type(value).__name__


def _bad_utf8(text: str) -> bool:
    """True for text decoded with surrogateescape from bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _HugeNumber:
    """A JSON integer too long for `int()` (Python's 4300-digit limit): kept as its text,
    so the entry holding it is named instead of the whole file failing to parse."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"

    __str__ = __repr__


def _parse_int(text: str) -> int | _HugeNumber:
    try:
        return int(text)
    except ValueError:
        return _HugeNumber(text)


def _json(text: str) -> tuple[Any, str | None, str]:
    """(value, None, "") for valid JSON, else (None, where it broke or None, the reason)."""
    try:
        return json.loads(text, parse_int=_parse_int), None, ""
    except json.JSONDecodeError as exc:
        return None, f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}"
    except RecursionError:  # json's parser recurses once per nesting level
        return None, None, "not valid JSON: nested too deeply"


def _read_text(path: Path, problems: _Problems) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file: {exc}") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problems.add(f"line {line}", f"not valid UTF-8 text (byte {exc.start})")
        # Keep parsing so the entries holding the bad bytes can be named too.
        return raw.decode("utf-8-sig", errors="surrogateescape")


# ----------------------------------------------------------------------------- parsers
def _parse_annotation(text: str, problems: _Problems) -> list[_Raw]:
    data, where, reason = _json(text)
    if reason:
        problems.add(where or "top level", reason)
        return []
    if not isinstance(data, dict) or not set(data) & set(SPLITS):
        keys = sorted(data)[:5] if isinstance(data, dict) else _kind(data)
        problems.add("top level", f"expected an object with keys {list(SPLITS)}, got {keys}")
        return []
    for key in sorted(set(data) - set(SPLITS)):
        problems.add(f"key {key!r}", "unknown top-level key; expected only train/val/test")
    raws = []
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            problems.add(split, f"expected a list of entries, got {_kind(entries)}")
            continue
        for index, entry in enumerate(entries):
            where = f"{split}[{index}]"
            if not isinstance(entry, dict):
                problems.add(where, f"expected an object, got {_kind(entry)}")
                continue
            missing = [k for k in ("id", "report", "image_path") if k not in entry]
            if missing:
                problems.add(where, f"missing key(s) {missing}", entry.get("id"))
                continue
            raws.append(_Raw(where, entry["id"], entry["report"], entry["image_path"], split,
                             entry.get("labels")))
    return raws


def _hash_split(study_id: str) -> str:
    """80/10/10 from sha256 of the id: the same on every run, machine and row order."""
    # surrogatepass: a lone surrogate (a JSON "\\ud800" escape) still hashes; such an id is
    # refused afterwards as not UTF-8, but the loader must get that far to say so.
    digest = hashlib.sha256(study_id.encode("utf-8", "surrogatepass")).hexdigest()
    bucket = int(digest[:8], 16) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _table_rows(rows: list[tuple[str, dict]], has_split: bool, problems: _Problems) -> list[_Raw]:
    raws = []
    for where, row in rows:
        missing = [k for k in ("image", "report") if row.get(k) in (None, "")]
        if missing:
            problems.add(where, f"empty or missing {missing}", row.get("id"))
            continue
        images = row["image"].split(";") if isinstance(row["image"], str) else row["image"]
        study_id = row.get("id")
        if study_id is None and isinstance(images, list) and images and isinstance(images[0], str):
            study_id = os.path.splitext(images[0].strip())[0]
        split = None
        if has_split:
            split = _SPLIT_NAMES.get(str(row.get("split") or "").strip().lower())
            if split is None:
                problems.add(where, f"missing or unknown split {row.get('split')!r}; "
                             f"expected one of {list(SPLITS)}", study_id)
                continue
        elif isinstance(study_id, (str, int)) and not isinstance(study_id, bool):
            split = _hash_split(str(study_id))
        raws.append(_Raw(where, study_id, row["report"], images, split))
    return raws


def _parse_csv(text: str, problems: _Problems) -> list[_Raw]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, header, last_line = [], [], 0
    try:
        header = reader.fieldnames or []  # reads the first record: it may not parse either
        if not {"image", "report"} <= set(header):
            problems.add("header", f"needs columns 'image' and 'report', found {header}")
            return []
        last_line = reader.line_num
        for row in reader:
            # A quoted field may span lines (and blank lines are skipped): name them all.
            first, last_line = last_line + 1, reader.line_num
            where = f"line {last_line}" if first == last_line else f"lines {first}-{last_line}"
            if None in row or None in row.values():
                problems.add(where, f"has a different number of fields than the header {header}")
                continue
            rows.append((where, row))
    except csv.Error as exc:
        hint = " (a quote left open?)" if "field limit" in str(exc) else ""
        problems.add(f"line {last_line + 1}", f"not valid CSV: {exc}{hint}")
    return _table_rows(rows, "split" in header, problems)


def _parse_jsonl(text: str, problems: _Problems) -> list[_Raw]:
    rows = []
    # Records end at "\n" only (JSON Lines): str.splitlines would also cut at U+2028, U+0085
    # and the like, which JSON allows unescaped inside a string (ensure_ascii=False writers).
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row, _, reason = _json(line)
        if reason:
            problems.add(f"line {number}", reason)
            continue
        if not isinstance(row, dict):
            problems.add(f"line {number}", f"expected an object, got {_kind(row)}")
            continue
        rows.append((f"line {number}", row))
    # Once any row names a split, a row without one is an error, never a guess.
    return _table_rows(rows, any("split" in row for _, row in rows), problems)


# ----------------------------------------------------------------------------- validation
def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _resolve_image(name: str, bases: list[str], root: str) -> tuple[str | None, str]:
    """(absolute path, "") for an existing image, else (None, the reason)."""
    candidates = [os.path.normpath(os.path.join(base, name)) for base in bases]
    if not all(_inside(c, root) for c in candidates):
        return None, f"image path {name!r} escapes the data folder {root}"
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate, ""
    if any(os.path.exists(c) for c in candidates):
        return None, f"image {name!r} is not a readable file"
    return None, f"image not found: {name!r} (looked in {', '.join(bases)})"


def _check_labels(labels: Any) -> tuple[dict[str, int] | None, str]:
    """Keep `labels` that speak of our findings (checked); ignore a foreign `labels` key."""
    if not isinstance(labels, dict) or not set(labels) & set(FINDINGS):
        return None, ""
    if set(labels) != set(FINDINGS) or any(labels[k] not in (0, 1) for k in FINDINGS):
        return None, f"labels must map every one of {list(FINDINGS)} to 0 or 1"
    return {k: int(labels[k]) for k in FINDINGS}, ""


def _check_entry(raw: _Raw, bases: list[str], root: str, problems: _Problems):
    """A validated (id, report, paths, labels), or None after recording the problems."""
    ok = True
    if isinstance(raw.id, bool) or not isinstance(raw.id, (str, int)) or not str(raw.id).strip():
        problems.add(raw.where, f"id must be a non-empty string, got {raw.id!r}")
        return None
    study_id = str(raw.id).strip()

    def fail(message: str) -> None:
        nonlocal ok
        ok = False
        problems.add(raw.where, message, study_id)

    if _bad_utf8(study_id):
        fail("id is not valid UTF-8")
    if not isinstance(raw.report, str) or not raw.report.strip():
        fail(f"empty report ({raw.report!r})")
    elif _bad_utf8(raw.report):
        fail("report is not valid UTF-8 text")
    images = [raw.images] if isinstance(raw.images, str) else raw.images
    paths = []
    if not isinstance(images, list) or not images or not all(
            isinstance(p, str) and p.strip() for p in images):
        fail(f"image_path must be a non-empty list of paths, got {raw.images!r}")
        images = []
    for name in images:
        path, reason = _resolve_image(name.strip(), bases, root)
        reason = reason or verify_file(path)
        if reason:
            fail(reason)
        paths.append(path)
    labels, reason = _check_labels(raw.labels)
    if reason:
        fail(reason)
    return (study_id, raw.report.strip(), tuple(paths), labels) if ok else None


def _build_records(raws: list[_Raw], bases: list[str], root: str,
                   problems: _Problems) -> dict[str, list[Record]]:
    cache = cache_dir_for(root)
    out: dict[str, list[Record]] = {split: [] for split in SPLITS}
    first_seen: dict[str, _Raw] = {}
    image_owner: dict[str, _Raw] = {}
    for raw in raws:
        checked = _check_entry(raw, bases, root, problems)
        if checked is None:
            continue
        study_id, report, paths, labels = checked
        earlier = first_seen.setdefault(study_id, raw)
        if earlier is not raw:
            what = "duplicate id" if earlier.split == raw.split else "study in more than one split"
            problems.add(raw.where, f"{what} (also at {earlier.where})", study_id)
            continue
        for path in paths:
            owner = image_owner.setdefault(path, raw)
            if owner.split != raw.split:
                problems.add(raw.where, f"image {path} is also used by {owner.where} "
                             f"id={str(owner.id)!r}: a study in more than one split", study_id)
        out[raw.split].append(Record(study_id, report, paths, raw.split, labels, cache))
    return out


def load_records(source: str | Path, image_dir: str | None = None) -> dict[str, list[Record]]:
    """Load and fully validate annotation.json / .csv / .jsonl into `{split: [Record]}`."""
    path = Path(source)
    if path.is_dir() and (path / "annotation.json").is_file():
        path = path / "annotation.json"
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    parsers = {".json": _parse_annotation, ".csv": _parse_csv, ".jsonl": _parse_jsonl}
    parse = parsers.get(path.suffix.lower())
    if parse is None:
        raise DataError(f"{path}: unknown data format; expected one of {sorted(parsers)}")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise DataError(f"{path}: image_dir {image_dir} is not a folder")
    root = os.path.abspath(image_dir if image_dir is not None else path.parent)
    bases = [root] if image_dir is not None else [root, os.path.join(root, "images")]
    problems = _Problems(path)
    raws = parse(_read_text(path, problems), problems)
    records = _build_records(raws, bases, root, problems)
    problems.raise_if_any()
    return records


def load_dataset(cfg: DataConfig) -> dict[str, list[Record]]:
    """Records for a data config: the (cached) synthetic set or a file, cut to max_* studies."""
    if cfg.source in SYNTHETIC_SOURCES:
        name = f"{cfg.source}_s{cfg.seed}_{cfg.n_train}_{cfg.n_val}_{cfg.n_test}_{cfg.image_size}"
        source = generate_synthetic(Path(cfg.root) / name, cfg.seed, cfg.n_train, cfg.n_val,
                                    cfg.n_test, cfg.image_size, SYNTHETIC_SOURCES[cfg.source])
        records = load_records(source)
    else:
        source = Path(cfg.source)
        records = load_records(source, cfg.image_dir)
    limits = {"train": cfg.max_train, "val": cfg.max_val, "test": cfg.max_test}
    for split, limit in limits.items():
        if limit is not None and limit < 0:
            raise DataError(f"{source}: max_{split} must be >= 0, got {limit}")
    subset = {s: recs if limits[s] is None else recs[:limits[s]] for s, recs in records.items()}
    if not subset["train"]:
        raise DataError(f"{source}: the train split is empty; training needs at least one study")
    return subset


# ----------------------------------------------------------------------------- torch
class ImageReportDataset(Dataset):
    """Records as `{"id", "image": (1, S, S) float in about [-1, 1], "report"}`.

    Views are decoded by `pipeline.data.images` (the decoder serving uses too) and read from
    the data set's film cache when the records name one. A study with several views gets the
    mean of its normalised views (`model_input`), so every study is one image of one shape.
    """

    def __init__(self, records: list[Record], image_size: int):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records, self.image_size = list(records), image_size
        self._caches: dict[str, ImageCache] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _view(self, record: Record, path: str) -> np.ndarray:
        if record.image_cache is None:
            return decode_file(path, self.image_size)
        cache = self._caches.get(record.image_cache)
        if cache is None:
            cache = self._caches[record.image_cache] = ImageCache(record.image_cache,
                                                                  self.image_size)
        return cache.load(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            views = [self._view(record, p) for p in record.image_paths]
        except ImageDecodeError as exc:
            raise DataError(f"id={record.id!r}: cannot decode {exc}") from exc
        return {"id": record.id, "image": model_input(views), "report": record.report}


def image_batch(records: list[Record], image_size: int) -> torch.Tensor:
    """The images of `records` as one batch (B, 1, S, S); B may be 0. For a few studies
    (probes, samples): a pass over a whole split uses `image_batches`."""
    dataset = ImageReportDataset(list(records), image_size)
    if not len(dataset):  # torch.stack refuses an empty list
        return torch.empty(0, 1, image_size, image_size)
    return collate([dataset[i] for i in range(len(dataset))])["images"]


def image_batches(records: list[Record], image_size: int, batch_size: int = 8):
    """The images of `records` in file order, `batch_size` studies at a time, each batch
    decoded when it is asked for: memory holds one batch, whatever the split's size."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = ImageReportDataset(list(records), image_size)
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        yield collate([dataset[i] for i in range(start, stop)])["images"]


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into `{"ids", "images": (B, 1, S, S), "reports"}`."""
    return {"ids": [item["id"] for item in batch],
            "images": torch.stack([item["image"] for item in batch]),
            "reports": [item["report"] for item in batch]}
