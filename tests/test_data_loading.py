"""Loaders: R2Gen / CSV / JSONL formats, path resolution, and every bad-input class."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, ImageReportDataset, Record, collate, load_dataset, load_records

REPORT = "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax."


def _png(path: Path, value: int = 128, mode: str = "L", size=(40, 30), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _entry(entry_id: str, *views: str, report: str = REPORT, **extra) -> dict:
    return {"id": entry_id, "report": report, "image_path": list(views or [f"{entry_id}/0.png"]),
            **extra}


def _r2gen(root: Path, splits: dict[str, list[dict]], images: bool = True) -> Path:
    """An R2Gen folder: annotation.json + images/<path> for every listed view."""
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for entries in splits.values():
            for entry in entries:
                for view in entry["image_path"]:
                    if not Path(view).is_absolute() and ".." not in view:
                        _png(root / "images" / view)
    path = root / "annotation.json"
    path.write_text(json.dumps(splits, ensure_ascii=False), encoding="utf-8")
    return path


def _raises(path: Path, *needles: str, image_dir: str | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_records(path, image_dir)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------- good input
def test_r2gen_layout_with_images_folder_multiview_and_extra_keys(tmp_path):
    path = _r2gen(tmp_path / "iu_xray", {
        "train": [_entry("CXR1", "CXR1/0.png", "CXR1/1.png", study_id=7, subject_id=3),
                  _entry("CXR2")],
        "val": [_entry("CXR3")],
        "test": []})
    records = load_records(path)
    assert [r.id for r in records["train"]] == ["CXR1", "CXR2"]
    first = records["train"][0]
    assert first == Record("CXR1", REPORT, (str(tmp_path / "iu_xray/images/CXR1/0.png"),
                                            str(tmp_path / "iu_xray/images/CXR1/1.png")), "train")
    assert records["val"][0].split == "val" and records["test"] == []
    assert load_records(path.parent)["train"][1].id == "CXR2"  # a folder holding annotation.json


def test_paths_relative_to_the_file_folder_and_missing_split_keys(tmp_path):
    _png(tmp_path / "views" / "a.png")
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [_entry("a", "views/a.png")]}))
    records = load_records(path)
    assert records["train"][0].image_paths == (str(tmp_path / "views" / "a.png"),)
    assert records["val"] == [] and records["test"] == []


def test_explicit_image_dir(tmp_path):
    _png(tmp_path / "elsewhere" / "s1" / "0.png")
    path = _r2gen(tmp_path / "ann", {"train": [_entry("s1")]}, images=False)
    _raises(path, "image not found", "'s1'")
    records = load_records(path, image_dir=str(tmp_path / "elsewhere"))
    assert records["train"][0].image_paths == (str(tmp_path / "elsewhere" / "s1" / "0.png"),)


def test_csv_with_split_and_id_columns(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "b1.png")
    _png(tmp_path / "images" / "b2.png")
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "report", "split"])
        writer.writerow(["a", "a.png", "Heart is enlarged, lungs clear.", "train"])
        writer.writerow(["b", "b1.png;b2.png", REPORT, "Validation"])
    records = load_records(path)
    assert [r.id for r in records["train"]] == ["a"]
    assert records["train"][0].report == "Heart is enlarged, lungs clear."
    assert len(records["val"][0].image_paths) == 2


def test_csv_without_split_gets_a_deterministic_80_10_10_split(tmp_path):
    rows = [(f"img{i}.png", f"{REPORT} Case {i}.") for i in range(300)]
    for name, _ in rows:
        _png(tmp_path / name, size=(8, 8))

    def write(order):
        path = tmp_path / "data.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "report"])
            writer.writerows(order)
        return {s: sorted(r.id for r in recs) for s, recs in load_records(path).items()}

    first, shuffled = write(rows), write(rows[::-1])
    assert first == shuffled
    assert 200 <= len(first["train"]) <= 280
    assert len(first["val"]) >= 15 and len(first["test"]) >= 15
    assert first["train"][0].startswith("img")  # id = image path without suffix


def test_jsonl_with_view_lists_and_rgb_jpeg(tmp_path):
    _png(tmp_path / "x" / "0.jpg", mode="RGB", fmt="JPEG")
    _png(tmp_path / "x" / "1.png", mode="RGB")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "x", "image": ["x/0.jpg", "x/1.png"], "report": REPORT,
                                "split": "test"}) + "\n\n", encoding="utf-8")
    records = load_records(path)
    assert records["test"][0].id == "x"
    item = ImageReportDataset(records["test"], 16)[0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32


def test_dataset_normalises_grayscale_rgb_and_averages_views(tmp_path):
    white = _png(tmp_path / "w.png", 255, mode="RGB")
    black = _png(tmp_path / "b.jpg", 0, fmt="JPEG")
    grey16 = tmp_path / "g16.png"
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(grey16)
    records = [Record("w", REPORT, (str(white),), "train"),
               Record("wb", REPORT, (str(white), str(black)), "train"),
               Record("g", REPORT, (str(grey16),), "train")]
    dataset = ImageReportDataset(records, 24)
    assert torch.allclose(dataset[0]["image"], torch.ones(1, 24, 24))
    assert dataset[1]["image"].abs().max() < 0.02  # mean of +1 and -1
    assert torch.allclose(dataset[2]["image"], torch.ones(1, 24, 24))
    batch = collate([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 1, 24, 24)
    assert batch["ids"] == ["w", "wb"] and batch["reports"] == [REPORT, REPORT]


def test_load_dataset_from_a_file_with_subsets(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry(f"t{i}") for i in range(5)],
                             "val": [_entry("v0")], "test": [_entry("e0"), _entry("e1")]})
    records = load_dataset(DataConfig(source=str(path), max_train=2, max_test=1))
    assert [r.id for r in records["train"]] == ["t0", "t1"]
    assert len(records["val"]) == 1 and len(records["test"]) == 1
    empty = _r2gen(tmp_path / "empty", {"train": [], "val": [_entry("v0")]})
    with pytest.raises(DataError, match="train split is empty"):
        load_dataset(DataConfig(source=str(empty)))


# ----------------------------------------------------------------------------- bad input
def test_missing_image(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry("ok"), _entry("gone", "nowhere/0.png")]})
    (tmp_path / "images" / "nowhere" / "0.png").unlink()
    _raises(path, "train[1]", "'gone'", "image not found", "nowhere/0.png")


def test_unreadable_image(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry("dir", "d/0.png")]}, images=False)
    (tmp_path / "images" / "d" / "0.png").mkdir(parents=True)
    _raises(path, "'dir'", "not a readable file")


@pytest.mark.parametrize("name, content", [
    ("garbage.png", b"this is not an image"),
    ("cut.png", "cut"),
    ("cut.jpg", "cut"),
])
def test_corrupt_image(tmp_path, name, content):
    path = _r2gen(tmp_path, {"train": [_entry("bad", f"s/{name}")]}, images=False)
    image = tmp_path / "images" / "s" / name
    if content == "cut":
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        _png(image)
        Image.fromarray(noise).save(image, format=fmt)
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    else:
        image.parent.mkdir(parents=True)
        image.write_bytes(content)
    _raises(path, "'bad'", "corrupt")


@pytest.mark.parametrize("report", ["", "   ", None, 3])
def test_empty_report(tmp_path, report):
    path = _r2gen(tmp_path, {"train": [_entry("e", report=report)]})
    _raises(path, "train[0]", "'e'", "empty report")


def test_duplicate_id_and_study_in_two_splits(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry("a"), _entry("a"), _entry("b")],
                             "test": [_entry("b")]})
    message = _raises(path, "2 problem(s)")
    assert "train[1] id='a': duplicate id (also at train[0])" in message
    assert "test[0] id='b': study in more than one split (also at train[2])" in message


def test_same_image_in_two_splits(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry("a", "x/0.png")], "val": [_entry("b", "x/0.png")]})
    _raises(path, "val[0]", "'b'", "more than one split")


def test_image_path_escaping_the_data_folder(tmp_path):
    outside = _png(tmp_path / "secret.png")
    path = _r2gen(tmp_path / "data", {"train": [_entry("up", "../secret.png"),
                                                _entry("abs", str(outside))]})
    message = _raises(path, "'up'", "'abs'", "escapes the data folder")
    assert message.count("escapes") == 2


def test_absolute_path_inside_the_data_folder_is_fine(tmp_path):
    inside = _png(tmp_path / "images" / "a.png")
    path = _r2gen(tmp_path, {"train": [_entry("a", str(inside))]})
    assert load_records(path)["train"][0].image_paths == (str(inside),)


@pytest.mark.parametrize("content, needle", [
    ("[]", "expected an object with keys"),
    ('{"train": {"id": 1}}', "train: expected a list"),
    ('{"train": ["x"]}', "train[0]: expected an object"),
    ('{"train": [{"id": "m", "report": "r"}]}', "train[0] id='m': missing key(s) ['image_path']"),
    ('{"train": [{"id": "p", "report": "r", "image_path": 5}]}', "id='p': image_path must be"),
    ('{"train": [], "extra": []}', "unknown top-level key"),
    ('{"train": [', "not valid JSON"),
    ('{"train": [{"id": "l", "report": "r", "image_path": ["l/0.png"], '
     '"labels": {"cardiomegaly": 2}}]}', "id='l': labels must map"),
])
def test_wrong_json_shape(tmp_path, content, needle):
    path = tmp_path / "annotation.json"
    path.write_text(content)
    _png(tmp_path / "images" / "l" / "0.png")
    _raises(path, needle)


def test_non_utf8_text_names_the_entry(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry("ok"), _entry("latin", report="caf\u00e9 heart")]})
    path.write_bytes(path.read_bytes().replace("caf\u00e9".encode("utf-8"), b"caf\xe9"))
    _raises(path, "not valid UTF-8", "train[1] id='latin'")


def test_csv_problems(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "d.csv"
    path.write_text("image,report,split\na.png,,train\na.png,fine,holdout\n")
    _raises(path, "line 2", "empty or missing ['report']", "line 3", "'holdout'")
    path.write_text("picture,text\na.png,r\n")
    _raises(path, "needs columns 'image' and 'report'")
    path.write_bytes(b"image,report\na.png,na\xefve\n")
    _raises(path, "not valid UTF-8", "id='a'")


def test_jsonl_problems(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    lines = [{"image": "a.png", "report": "r", "split": "train"}, {"image": "a.png", "report": "r"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n[1]\nnot json\n")
    _raises(path, "line 2", "unknown split None", "line 3: expected an object",
            "line 4: not valid JSON")


def test_all_problems_are_collected_into_one_error(tmp_path):
    path = _r2gen(tmp_path, {"train": [_entry(f"s{i}", report="") for i in range(25)]})
    message = _raises(path, "25 problem(s)", "... and 5 more", "id='s0'", "id='s19'")
    assert "id='s20'" not in message


def test_missing_data_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(tmp_path / "d.txt")
