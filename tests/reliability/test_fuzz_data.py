"""Fuzzed datasets: loading succeeds cleanly or raises one DataError naming the file and entry.

Hypothesis builds dataset folders the way `load_records` reads them (R2Gen annotation.json
with `images/`, CSV, JSONL), plants faults (corrupt, truncated, missing and symlinked images,
wrong JSON types, empty and huge reports, latin-1 / BOM / invalid UTF-8 / UTF-16 text) and
loads them, then builds an image batch of every split (images are decoded lazily). Each
fault is either definite (loading must fail, naming the entry), benign (loading must succeed
and return what was written) or either (a byte-flipped image may still decode). Nothing else
may escape: any other exception fails the test with the example that raised it.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data import DataError, image_batch, load_records
from tests.reliability.tally import count

pytestmark = pytest.mark.property

SIZE = 16
GOOD_IMAGES = ("png", "png_rgb", "png16", "jpeg", "symlink_out_png")
BAD_IMAGES = ("text", "empty", "truncated_png", "truncated_jpeg", "missing", "directory",
              "dangling_symlink", "symlink_loop", "symlink_out_text", "escape_dotdot",
              "escape_absolute")
MAYBE_IMAGES = ("flipped_png", "flipped_jpeg")
# Report kinds: text (drawn), huge (60k chars, under csv's field limit), blank ones (refused),
# wrong JSON types (refused), and one over csv's 131072-character field limit (refused).
BAD_REPORTS = {"empty": "", "blank": " \t ", "null": None, "number": 3, "list": ["a", "b"]}
BAD_IDS = {"empty": "", "null": None, "bool": True, "float": 1.5, "list": ["s"],
           "huge_int": "HUGE_INT"}
# File-level faults; under those in NAMES_ENTRIES the file still parses, so each faulty entry
# must be named in the error.
FILE_FAULTS = ("none", "bom", "latin1", "invalid_utf8", "utf16", "truncated", "deep_nesting",
               "wrong_top_level", "missing_file")
NAMES_ENTRIES = ("none", "bom", "latin1", "invalid_utf8")
PLANT = "PLANTEDBYTES"


@dataclass(frozen=True)
class Entry:
    split: str
    report: str  # the drawn text, used when report_kind is "text"
    report_kind: str
    id_kind: str  # "ok" or a key of BAD_IDS
    views: tuple[str, ...]
    flips: tuple[tuple[float, int], ...]  # (relative position, new byte) for flipped images

    @property
    def definite(self) -> bool:
        return (self.report_kind in BAD_REPORTS or self.report_kind == "overlong"
                or self.id_kind != "ok" or any(v in BAD_IMAGES for v in self.views))

    @property
    def maybe(self) -> bool:
        return any(v in MAYBE_IMAGES for v in self.views)


@dataclass(frozen=True)
class Spec:
    fmt: str  # json, csv, jsonl
    with_split: bool
    entries: tuple[Entry, ...]
    file_fault: str
    planted: int  # the entry whose report carries the planted bytes (latin1 / invalid_utf8)
    cut: float  # where a truncated data file or image is cut


def _entry(fmt: str):
    report_kinds = ["text", "text", "text", "huge", "empty", "blank"]
    id_kinds = ["ok"] * 6 + ["empty"]
    if fmt == "csv":
        report_kinds += ["overlong"]
    else:  # only JSON can carry other types
        report_kinds += ["null", "number", "list"]
        id_kinds += ["bool", "float", "list", "huge_int"]
    if fmt == "json":  # a JSONL row without an id takes its image path's
        id_kinds += ["null"]
    views = st.sampled_from(GOOD_IMAGES * 3 + BAD_IMAGES + MAYBE_IMAGES)
    clean = st.builds(Entry, split=st.sampled_from(("train", "val", "test")),
                      report=st.text(min_size=1, max_size=60).filter(str.strip),
                      report_kind=st.sampled_from(("text", "text", "huge")), id_kind=st.just("ok"),
                      views=st.lists(st.sampled_from(GOOD_IMAGES), min_size=1,
                                     max_size=2).map(tuple), flips=st.just(()))
    faulty = st.builds(
        Entry, split=st.sampled_from(("train", "val", "test")),
        report=st.text(min_size=1, max_size=60).filter(str.strip),
        report_kind=st.sampled_from(report_kinds), id_kind=st.sampled_from(id_kinds),
        views=st.lists(views, min_size=1, max_size=2).map(tuple),
        flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 255)), min_size=1,
                       max_size=6).map(tuple))
    # Mostly clean entries, so that whole datasets load often enough to check what they hold.
    return st.one_of(clean, clean, faulty)


@st.composite
def specs(draw) -> Spec:
    fmt = draw(st.sampled_from(("json", "csv", "jsonl")))
    entries = tuple(draw(st.lists(_entry(fmt), min_size=1, max_size=4)))
    file_fault = draw(st.one_of(st.sampled_from(("none", "bom")), st.sampled_from(FILE_FAULTS)))
    return Spec(fmt, fmt == "json" or draw(st.booleans()), entries, file_fault,
                draw(st.integers(0, len(entries) - 1)), draw(st.floats(0.05, 0.95)))


# ----------------------------------------------------------------------------- building
def _image_bytes(kind: str) -> bytes:
    pixels = np.random.default_rng(len(kind)).integers(0, 256, (32, 24), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if kind == "png_rgb":
        image = image.convert("RGB")
    elif kind == "png16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if "jpeg" in kind else "PNG")
    return buffer.getvalue()


def _write_view(kind: str, target: Path, outside: Path, spec: Spec, entry: Entry) -> str:
    """Create the view at `target` (images/<id>/<k>.png) and return the path to list."""
    name = str(target.relative_to(target.parents[2] / "images"))
    target.parent.mkdir(parents=True, exist_ok=True)
    outside.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("png", "png_rgb", "png16", "jpeg"):
        target.write_bytes(_image_bytes(kind))
    elif kind in ("flipped_png", "flipped_jpeg"):
        data = bytearray(_image_bytes(kind))
        for where, value in entry.flips:
            data[int(where * len(data))] = value
        target.write_bytes(bytes(data))
    elif kind in ("truncated_png", "truncated_jpeg"):
        data = _image_bytes(kind)
        target.write_bytes(data[:int(spec.cut * len(data))])
    elif kind == "text":
        target.write_bytes(b"The heart is normal. This is a report, not an image.\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    elif kind == "symlink_out_png":
        outside.write_bytes(_image_bytes("png"))
        target.symlink_to(outside)
    elif kind == "symlink_out_text":
        outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
        target.symlink_to(outside)
    elif kind == "dangling_symlink":
        target.symlink_to(outside)  # never created
    elif kind == "symlink_loop":
        target.symlink_to(target)
    elif kind in ("escape_dotdot", "escape_absolute"):
        outside.write_bytes(_image_bytes("png"))
        return str(outside) if kind == "escape_absolute" else f"../{outside.parent.name}/{outside.name}"
    elif kind != "missing":
        raise AssertionError(kind)
    return name


def _report(entry: Entry, index: int, spec: Spec):
    if entry.report_kind in BAD_REPORTS:
        return BAD_REPORTS[entry.report_kind]
    text = {"huge": "Heart size is normal. " * 2800, "overlong": "x" * 140_000}.get(
        entry.report_kind, entry.report)
    if index == spec.planted and spec.file_fault in ("latin1", "invalid_utf8"):
        text += " " + PLANT
    return text


def _table_text(rows: list[dict], spec: Spec) -> tuple[str, list[tuple[int, int]]]:
    """CSV text and the lines each row spans (universal newlines: how csv counts lines)."""
    columns = ["id", "image", "report"] + (["split"] if spec.with_split else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    spans = []

    def lines() -> int:
        return len(io.StringIO(buffer.getvalue(), newline="").readlines())

    for row in rows:
        first = lines() + 1
        writer.writerow({k: row[k] for k in columns})
        spans.append((first, lines()))
    return buffer.getvalue(), spans


def build(spec: Spec, root: Path) -> tuple[Path, list[dict]]:
    """Write the dataset of `spec` under root/data; (data file, one dict per entry)."""
    data, outside = root / "data", root / "outside"
    rows, per_split = [], {"train": 0, "val": 0, "test": 0}
    for index, entry in enumerate(spec.entries):
        study = f"s{index}"
        views = [_write_view(kind, data / "images" / study / f"{k}.png",
                             outside / f"{study}_{k}.png", spec, entry)
                 for k, kind in enumerate(entry.views)]
        study_id = study if entry.id_kind == "ok" else BAD_IDS[entry.id_kind]
        where = f"{entry.split}[{per_split[entry.split]}]" if spec.fmt == "json" else None
        per_split[entry.split] += 1
        rows.append({"id": study_id, "image": views, "report": _report(entry, index, spec),
                     "split": entry.split, "where": where, "entry": entry, "study": study})
    if spec.fmt == "json":
        splits = {s: [{"id": r["id"], "report": r["report"], "image_path": r["image"]}
                      for r in rows if r["split"] == s] for s in ("train", "val", "test")}
        text = json.dumps(splits, ensure_ascii=False)
        path = data / "annotation.json"
    elif spec.fmt == "jsonl":
        lines = []
        for number, row in enumerate(rows, 1):
            record = {"id": row["id"], "image": row["image"], "report": row["report"]}
            if spec.with_split:
                record["split"] = row["split"]
            lines.append(json.dumps(record, ensure_ascii=False))
            row["where"] = f"line {number}"
        text, path = "\n".join(lines) + "\n", data / "data.jsonl"
    else:
        flat = [{**r, "image": ";".join(r["image"])} for r in rows]
        text, spans = _table_text(flat, spec)
        for row, (first, last) in zip(rows, spans):
            row["where"] = f"line {first}" if first == last else f"lines {first}-{last}"
            row["first_line"] = f"line {first}"  # where an unparseable record starts
        path = data / "data.csv"
    text = text.replace('"HUGE_INT"', "9" * 5000)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(text, spec))
    return path, rows


def _encode(text: str, spec: Spec) -> bytes:
    fault = spec.file_fault
    if fault == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    if fault == "latin1":
        return text.encode("latin-1", "replace").replace(PLANT.encode(), b"caf\xe9")
    if fault == "invalid_utf8":
        return text.encode("utf-8").replace(PLANT.encode(), b"\xff\xfe\xc3(")
    if fault == "utf16":
        return text.encode("utf-16")
    if fault == "truncated":
        data = text.encode("utf-8")
        return data[:int(spec.cut * len(data))]
    if fault == "deep_nesting":
        return b"[" * 200_000 + b"]" * 200_000
    if fault == "wrong_top_level":  # JSON where rows are expected; a list where an object is
        return b'{"train": []}\n' if spec.fmt == "csv" else json.dumps([text[:50]]).encode()
    return text.encode("utf-8")


# ----------------------------------------------------------------------------- the property
def _load(path: Path, spec: Spec):
    """Load and batch every split; (records, batches) or the DataError and where it rose."""
    if spec.file_fault == "missing_file":
        path.unlink()
    try:
        records = load_records(path)
    except DataError as exc:
        return None, exc, "load"
    try:
        batches = {s: image_batch(recs, SIZE) for s, recs in records.items()}
    except DataError as exc:
        return records, exc, "batch"
    return (records, batches), None, None


def _planted(spec: Spec) -> bool:
    """Whether bad bytes were planted in a report (a report of the wrong type carries none)."""
    return (spec.file_fault in ("latin1", "invalid_utf8")
            and spec.entries[spec.planted].report_kind not in BAD_REPORTS)


def _expected(spec: Spec) -> str:
    if spec.file_fault == "truncated":  # the cut may drop the faulty entries, or keep them
        return "either"
    if (spec.file_fault not in ("none", "bom", "latin1", "invalid_utf8") or _planted(spec)
            or any(e.definite for e in spec.entries)):
        return "error"
    return "either" if any(e.maybe for e in spec.entries) else "ok"


def _check_entries_named(message: str, rows: list[dict], spec: Spec) -> None:
    """Every faulty entry is named: by its id, or by where it is when the id is the fault."""
    for index, row in enumerate(rows):
        entry = row["entry"]
        if entry.report_kind == "overlong":  # csv stops reading at the record it cannot parse
            assert f"{row['first_line']}: not valid CSV" in message, message
            return
        if not (entry.definite or (index == spec.planted and _planted(spec))):
            continue
        if entry.id_kind != "ok":  # an empty id is still quoted: `line 2 id='': ...`
            assert f"{row['where']}:" in message or f"{row['where']} id=" in message, \
                (row["where"], message)
        else:
            assert f"id='{row['study']}'" in message, (row["study"], message)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs())
def test_fuzzed_dataset_loads_cleanly_or_raises_one_data_error(spec):
    with tempfile.TemporaryDirectory() as tmp:
        path, rows = build(spec, Path(tmp))
        loaded, error, stage = _load(path, spec)
        expected = _expected(spec)
        count("datasets", "DataError" if error else "loaded")
        if error is None:
            assert expected != "error", f"loaded a dataset with a planted fault: {spec}"
            records, batches = loaded
            for split, recs in records.items():
                assert batches[split].shape == (len(recs), 1, SIZE, SIZE)
                assert torch.isfinite(batches[split]).all()
                assert (batches[split].abs() <= 1.0 + 1e-6).all()
            if spec.file_fault != "truncated":  # a cut file may lose its last entries
                assert sum(map(len, records.values())) == len(rows)
                by_id = {r.id: r for recs in records.values() for r in recs}
                for row in rows:
                    assert by_id[row["study"]].report == row["report"].strip()
                    assert by_id[row["study"]].split == row["split"] or not spec.with_split
            return
        message = str(error)
        assert expected != "ok", f"refused a clean dataset: {message}"
        if stage == "batch":  # a lazily decoded view: its path and its study
            assert "cannot decode" in message and "id='s" in message, message
            assert message.startswith(str(path.parent / "images")), message
            return
        assert str(path) in message, message
        if spec.file_fault in NAMES_ENTRIES:
            _check_entries_named(message, rows, spec)
        if _planted(spec):
            assert "not valid UTF-8" in message, message


# ----------------------------------------------------------------------------- regressions
# Each was a fuzz failure: an exception other than DataError, or a clean file refused.
def _write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("L", (8, 8), 5).save(tmp_path / "images" / "a.png")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, line", [
    ("annotation.json", '{"train": [{"id": %s, "report": "r", "image_path": ["a.png"]}]}'),
    ("data.jsonl", '{"id": %s, "image": "a.png", "report": "r"}\n'),
])
def test_an_integer_too_long_for_python_names_the_entry(tmp_path, name, line):
    """json.loads raised ValueError (Python's 4300-digit int limit) instead of a DataError."""
    path = _write(tmp_path, name, line % ("9" * 5000))
    with pytest.raises(DataError, match=r"(train\[0\]|line 1): id must be a non-empty string, "
                                        r"got <integer of 5000 digits>"):
        load_records(path)


@pytest.mark.parametrize("name, text", [
    ("annotation.json", "[" * 200_000 + "]" * 200_000),
    ("data.jsonl", '{"id": "a", "image": "a.png", "report": "r"}\n' + "[" * 200_000 + "\n"),
])
def test_deeply_nested_json_is_a_data_error(tmp_path, name, text):
    """json.loads raised RecursionError."""
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match="not valid JSON: nested too deeply"):
        load_records(path)


def test_a_lone_surrogate_id_without_a_split_column(tmp_path):
    """The hash split encoded the id with surrogateescape: UnicodeEncodeError on '\\ud800'."""
    path = _write(tmp_path, "data.jsonl", '{"id": "\\ud800", "image": "a.png", "report": "r"}\n')
    with pytest.raises(DataError, match=r"line 1 id='\\ud800': id is not valid UTF-8"):
        load_records(path)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x1c"])
def test_jsonl_report_with_a_unicode_line_separator_loads(tmp_path, separator):
    """str.splitlines cut the record at U+2028 and the like: a valid file was refused."""
    report = f"Heart normal.{separator}Lungs clear."
    record = json.dumps({"id": "a", "image": "a.png", "report": report}, ensure_ascii=False)
    if separator == "\x1c":  # a control character: JSON writers escape it, so must we
        assert "\\u001c" in record
    path = _write(tmp_path, "data.jsonl", record + "\n")
    (loaded,) = [r for recs in load_records(path).values() for r in recs]
    assert loaded.report == report


def test_csv_problem_names_the_lines_a_quoted_record_spans(tmp_path):
    """A multi-line record was named by its last line; a too-long field by the line before."""
    path = _write(tmp_path, "data.csv",
                  'id,image,report\nx,a.png,"Heart normal.\nLungs clear."\ny,a.png,\n')
    with pytest.raises(DataError, match=r"line 4 id='y': empty or missing \['report'\]"):
        load_records(path)
    path.write_text("id,image,report\nx,a.png,fine\ny,a.png," + "z" * 140_000 + "\n")
    with pytest.raises(DataError, match=r"line 3: not valid CSV: field larger than field limit"):
        load_records(path)
    path.write_text('id,image,report\nx,a.png,"Heart normal.\nLungs clear."\ny,a.png,\n'
                    'z,a.png,"a\nb",extra\n')
    with pytest.raises(DataError, match=r"lines 5-6: has a different number of fields"):
        load_records(path)


def test_csv_header_over_the_field_limit(tmp_path):
    """csv.Error escaped from reading the header (DictReader.fieldnames)."""
    path = _write(tmp_path, "data.csv", "[" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"line 1: not valid CSV: field larger") as info:
        load_records(path)
    assert len(str(info.value)) < 2000


def test_a_huge_value_quoted_in_a_problem_is_cut(tmp_path):
    """One problem quoting a 1 MB report must not bury the others."""
    path = _write(tmp_path, "annotation.json", json.dumps({"train": [
        {"id": "big", "report": ["x" * 1_000_000], "image_path": ["a.png"]},
        {"id": "gone", "report": "r", "image_path": ["nowhere.png"]}]}))
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert "id='big': empty report" in message and "characters)" in message
    assert "id='gone': image not found" in message and len(message) < 3000


def test_image_batch_of_no_records_is_empty(tmp_path):
    """torch.stack raised RuntimeError on an empty split."""
    assert image_batch([], SIZE).shape == (0, 1, SIZE, SIZE)
