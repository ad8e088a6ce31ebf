"""`prepare`: tiny IU X-Ray and MIMIC-CXR releases in their official raw layouts -> the R2Gen
layout, checked field by field, loaded by the project's loader, and the summary printed."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data.dataset import DataError, load_records
from pipeline.data.prepare import prepare_iu_xray, prepare_mimic_cxr, r2gen_split, write_prepared
from pipeline.data.report_sections import findings_section, section, split_sections
from steps.prepare import main as prepare_cli

# ---------------------------------------------------------------------------- IU X-Ray fixture
_IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="CXR{n}"/>
  <pmcId id="{n}"/>
  <docSource>CXR</docSource>
  <IUXRId id="{n}"/>
  <licenseType>open-access</licenseType>
  <ccLicense>byncnd</ccLicense>
  <publisher>Indiana University</publisher>
  <title>Indiana University Chest X-ray Collection</title>
  <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
    <Article PubModel="Electronic">
      <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
      <Abstract>
        <AbstractText Label="COMPARISON">None.</AbstractText>
        <AbstractText Label="INDICATION">XXXX-year-old with cough.</AbstractText>
        {findings}
        {impression}
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH><major>normal</major></MeSH>
  {images}
</eCitation>
"""
_PARENT_IMAGE = """<parentImage id="{image}">
    <figureId>F{k}</figureId>
    <caption>Xray Chest PA and Lateral</caption>
    <panel type="single"><url>/hadoop/storage/radiology/extract/{image}.jpg</url></panel>
  </parentImage>"""
NORMAL = ("The heart size and pulmonary vascularity appear within normal limits.\n"
          "      The lungs are free of focal airspace disease. No pneumothorax or effusion.")


def _film(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)


def _iu_study(root: Path, n: int, findings: str | None, impression: str | None,
              images: int, films: int | None = None) -> list[str]:
    """Write report `n`.xml naming `images` films, of which the first `films` exist."""
    names = [f"CXR{n}_1_IM-{n:04d}-{1001 + 1000 * k}" for k in range(images)]
    xml = _IU_XML.format(
        n=n,
        findings=f'<AbstractText Label="FINDINGS">{findings}</AbstractText>' if findings
        else '<AbstractText Label="FINDINGS"/>',
        impression=f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
        if impression else '<AbstractText Label="IMPRESSION"/>',
        images="\n  ".join(_PARENT_IMAGE.format(image=name, k=k) for k, name in enumerate(names)))
    (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
    (root / "ecgen-radiology" / f"{n}.xml").write_text(xml, encoding="utf-8")
    for name in names[:len(names) if films is None else films]:
        _film(root / "NLMCXR_png" / f"{name}.png")
    return names


@pytest.fixture
def iu_release(tmp_path):
    root = tmp_path / "iu"
    for n in range(1, 10):  # nine usable studies beside the special ones
        _iu_study(root, n, f"Study {n}. " + NORMAL, "No acute disease.", images=2)
    _iu_study(root, 10, "Mild cardiomegaly. Small left pleural effusion.", "Cardiomegaly.",
              images=3)
    _iu_study(root, 11, None, "Possible right lower lobe pneumonia.", images=2)
    _iu_study(root, 12, "Calcified granuloma.", "No acute disease.", images=1)
    _iu_study(root, 13, "Clear lungs.", "Normal chest.", images=0)
    _iu_study(root, 14, "Clear lungs.", "Normal chest.", images=2, films=0)
    (root / "ecgen-radiology" / "15.xml").write_text("<eCitation><uId", encoding="utf-8")
    return root


def _annotation(out: Path) -> dict:
    return json.loads((out / "annotation.json").read_text(encoding="utf-8"))


def _entries(out: Path) -> dict[str, dict]:
    return {e["id"]: e for split in _annotation(out).values() for e in split}


def test_iu_xray_writes_the_r2gen_layout_field_by_field(iu_release, tmp_path):
    out = tmp_path / "iu_xray"
    write_prepared(prepare_iu_xray(iu_release / "ecgen-radiology", iu_release / "NLMCXR_png"),
                   out)
    annotation = _annotation(out)
    assert list(annotation) == ["train", "val", "test"]
    assert [len(annotation[s]) for s in ("train", "val", "test")] == [7, 1, 2]  # 7:1:2 of 10
    entries = _entries(out)
    assert sorted(entries) == sorted(f"CXR{n}_1_IM-{n:04d}" for n in range(1, 11))
    first = entries["CXR1_1_IM-0001"]
    assert list(first) == ["id", "source", "report", "image_path", "split"]
    assert first["report"] == "Study 1. " + " ".join(NORMAL.split())  # whitespace collapsed
    assert first["image_path"] == ["CXR1_1_IM-0001-1001.png", "CXR1_1_IM-0001-2001.png"]
    assert first["source"] == "1.xml"
    for split, listed in annotation.items():
        assert all(e["split"] == split for e in listed)
    # Three films listed: the first two, in the report's order.
    assert entries["CXR10_1_IM-0010"]["image_path"] == ["CXR10_1_IM-0010-1001.png",
                                                        "CXR10_1_IM-0010-2001.png"]
    assert entries["CXR10_1_IM-0010"]["report"] == ("Mild cardiomegaly. Small left pleural "
                                                    "effusion.")
    left_out = pd.read_csv(out / "left_out.csv").set_index("id")["reason"].to_dict()
    assert left_out == {"CXR11_1_IM-0011": "no findings",
                        "CXR12_1_IM-0012": "1 view(s), 2 needed",
                        "13": "no image", "CXR14_1_IM-0014": "no image file found",
                        "15": "unreadable XML"}
    assert pd.read_csv(out / "left_out.csv").set_index("id").loc["15", "detail"]  # the parser's


def test_iu_xray_impression_fallback_and_one_view(iu_release):
    reports, films = iu_release / "ecgen-radiology", iu_release / "NLMCXR_png"
    prepared = prepare_iu_xray(reports, films, fallback="impression", min_views=1)
    kept = {s.id: s for s in prepared.studies}
    assert kept["CXR11_1_IM-0011"].report == "Possible right lower lobe pneumonia."
    assert kept["CXR12_1_IM-0012"].image_path == ("CXR12_1_IM-0012-1001.png",)
    assert len(kept) == 12


def test_the_project_loads_the_prepared_folder(iu_release, tmp_path):
    for mode in ("link", "copy"):
        out = tmp_path / f"iu_{mode}"
        write_prepared(prepare_iu_xray(iu_release / "ecgen-radiology",
                                       iu_release / "NLMCXR_png"), out, images=mode)
        records = load_records(out)
        assert [len(records[s]) for s in ("train", "val", "test")] == [7, 1, 2]
        record = next(r for rs in records.values() for r in rs if r.id == "CXR1_1_IM-0001")
        assert [Path(p).name for p in record.image_paths] == ["CXR1_1_IM-0001-1001.png",
                                                            "CXR1_1_IM-0001-2001.png"]
        assert (out / "images").is_symlink() == (mode == "link")
    with pytest.raises(DataError, match="not a link"):  # a copied folder is never replaced
        write_prepared(prepare_iu_xray(iu_release / "ecgen-radiology",
                                       iu_release / "NLMCXR_png"), tmp_path / "iu_copy")


def test_r2gen_split_is_seeded_and_7_1_2():
    ids = [f"CXR{n}" for n in range(2955)]
    split = r2gen_split(ids, seed=0)
    assert [sum(v == s for v in split.values()) for s in ("train", "val", "test")] == \
        [2069, 296, 590]  # R2Gen's IU X-Ray counts
    assert r2gen_split(list(reversed(ids)), seed=0) == split  # the order given does not matter
    assert r2gen_split(ids, seed=1) != split


def test_missing_release_folder_is_one_error(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        prepare_iu_xray(tmp_path / "nowhere", tmp_path)
    with pytest.raises(DataError, match="no .xml report"):
        prepare_iu_xray(tmp_path, tmp_path)


# ---------------------------------------------------------------------------- MIMIC-CXR
def _mimic_report(findings: str | None, impression: str | None = "No acute process.",
                  findings_header: str = "FINDINGS") -> str:
    lines = ["                                 FINAL REPORT",
             " EXAMINATION:  CHEST (PA AND LAT)", " ",
             " INDICATION:  ___F with cough.  Evaluate for pneumonia.", " ",
             " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  None.", " "]
    if findings is not None:
        lines += [f" {findings_header}: ", " "] + [f" {line}" for line in findings.split("\n")]
        lines += [" "]
    if impression is not None:
        lines += [" IMPRESSION: ", " ", f" {impression}", " "]
    return "\n".join(lines) + "\n"


# (subject, study, report or None, [(dicom, view, split or None, film exists)])
_MIMIC = [
    ("10000001", "50000001",
     _mimic_report("PA and lateral views of the chest provided.  There is no focal\n"
                   "consolidation, effusion, or pneumothorax."),
     [("d1-ap", "AP", "train", True), ("d1-pa", "PA", "train", True),
      ("d1-lat", "LATERAL", "train", True)]),
    ("10000001", "50000002",
     _mimic_report("Right IJ catheter tip in the SVC.  Streaky bibasilar opacities.",
                   findings_header="PORTABLE AP CHEST"),
     [("d2-ap", "AP", "train", True)]),
    ("10000002", "50000003", _mimic_report(None, "Possible left lower lobe pneumonia."),
     [("d3-pa", "PA", "test", True)]),
    ("10000003", "50000005", _mimic_report("Small right pleural effusion."),
     [("d5-pa", "PA", "train", False)]),
    ("10000003", "50000006", _mimic_report("Mild cardiomegaly."), []),
    ("10000004", "50000007", None, [("d7-pa", "PA", "train", True)]),
    ("10000005", "50000008", _mimic_report("Lungs are clear."),
     [("d8-ll", "LL", "validate", True)]),
    ("10000006", "50000009", _mimic_report("No pneumothorax.  Heart size is normal."),
     [("d9-lat", "LATERAL", "test", True), ("d9-pa", "PA", "test", True)]),
    ("10000007", "50000010", _mimic_report("Lungs are clear."), [("d10-pa", "PA", None, True)]),
]


@pytest.fixture
def mimic_release(tmp_path):
    root = tmp_path / "mimic"
    meta, split = [], []
    for subject, study, report, films in _MIMIC:
        folder = f"p{subject[:2]}/p{subject}"
        if report is not None:
            path = root / "mimic-cxr-reports" / "files" / folder / f"s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report, encoding="utf-8")
        for dicom, view, official, exists in films:
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                         "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                         "ViewPosition": view, "Rows": 8, "Columns": 8,
                         "StudyDate": 21800506, "StudyTime": 213014.531})
            if official is not None:
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                              "split": official})
            if exists:
                _film(root / "mimic-cxr-jpg" / "files" / folder / f"s{study}" / f"{dicom}.jpg")
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    return root


def _prepare_mimic(root: Path, **kwargs):
    return prepare_mimic_cxr(root / "mimic-cxr-reports", root / "mimic-cxr-jpg",
                             root / "mimic-cxr-2.0.0-metadata.csv",
                             root / "mimic-cxr-2.0.0-split.csv", **kwargs)


def test_mimic_cxr_writes_the_r2gen_layout_field_by_field(mimic_release, tmp_path):
    out = tmp_path / "mimic_cxr"
    write_prepared(_prepare_mimic(mimic_release), out)
    annotation = _annotation(out)
    assert {s: [e["id"] for e in v] for s, v in annotation.items()} == {
        "train": ["s50000001", "s50000002"], "val": ["s50000008"], "test": ["s50000009"]}
    first = _entries(out)["s50000001"]
    assert first == {
        "id": "s50000001", "study_id": 50000001, "subject_id": 10000001,
        "report": "PA and lateral views of the chest provided. There is no focal "
                  "consolidation, effusion, or pneumothorax.",
        "image_path": ["p10/p10000001/s50000001/d1-pa.jpg",  # PA before AP, then the lateral
                       "p10/p10000001/s50000001/d1-lat.jpg"],
        "split": "train"}
    entries = _entries(out)
    # A view-named header is MIMIC's parser's findings section.
    assert entries["s50000002"]["report"] == ("Right IJ catheter tip in the SVC. Streaky "
                                              "bibasilar opacities.")
    assert entries["s50000002"]["image_path"] == ["p10/p10000001/s50000002/d2-ap.jpg"]
    assert entries["s50000008"]["image_path"] == ["p10/p10000005/s50000008/d8-ll.jpg"]
    assert entries["s50000009"]["image_path"] == ["p10/p10000006/s50000009/d9-pa.jpg",
                                                  "p10/p10000006/s50000009/d9-lat.jpg"]
    left_out = pd.read_csv(out / "left_out.csv").set_index("id")["reason"].to_dict()
    assert left_out == {"s50000003": "no findings", "s50000005": "no image file found",
                        "s50000006": "no image", "s50000007": "no report",
                        "s50000010": "not in the split file"}
    records = load_records(out)  # the project reads what was written
    assert [len(records[s]) for s in ("train", "val", "test")] == [2, 1, 1]


def test_mimic_cxr_impression_fallback_and_gzipped_csvs(mimic_release):
    for name in ("metadata", "split"):  # PhysioNet ships them gzipped
        csv = mimic_release / f"mimic-cxr-2.0.0-{name}.csv"
        pd.read_csv(csv).to_csv(f"{csv}.gz", index=False)
        csv.unlink()
    prepared = prepare_mimic_cxr(mimic_release / "mimic-cxr-reports",
                                 mimic_release / "mimic-cxr-jpg",
                                 mimic_release / "mimic-cxr-2.0.0-metadata.csv.gz",
                                 mimic_release / "mimic-cxr-2.0.0-split.csv.gz",
                                 fallback="impression")
    kept = {s.id: s for s in prepared.studies}
    assert kept["s50000003"].report == "Possible left lower lobe pneumonia."
    assert kept["s50000003"].split == "test"
    assert kept["s50000001"].image_path[0] == "p10/p10000001/s50000001/d1-pa.jpg"


def test_mimic_cxr_names_a_missing_csv_column(mimic_release, tmp_path):
    bad = tmp_path / "split.csv"
    pd.DataFrame({"dicom_id": ["d1-pa"]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['split'\]"):
        prepare_mimic_cxr(mimic_release / "mimic-cxr-reports", mimic_release / "mimic-cxr-jpg",
                          mimic_release / "mimic-cxr-2.0.0-metadata.csv", bad)


@pytest.mark.parametrize("text, findings", [
    (_mimic_report("Clear lungs."), "Clear lungs."),
    (_mimic_report("Clear lungs.", findings_header="CHEST, TWO VIEWS"), "Clear lungs."),
    (_mimic_report("Clear lungs.", findings_header="FINDINGS AND IMPRESSION"), ""),  # impression
    (_mimic_report(None), ""),
    (_mimic_report("") + " FINDINGS: \n \n Second findings.\n", "Second findings."),
    (" Heart normal.\n \n Lungs clear.\n", ""),  # no header: one "full report" section
])
def test_findings_as_mimics_section_parser_reads_them(text, findings):
    assert findings_section(text) == findings


def test_a_report_without_findings_or_impression_gets_its_last_paragraph():
    text = "   FINAL REPORT\n EXAMINATION:  CHEST\n \n Heart normal.\n \n Lungs clear.\n"
    names = [name for name, _ in split_sections(text)]
    assert names == ["preamble", "examination", "last_paragraph"]
    assert section(text, "last_paragraph") == "Heart normal.\n \n Lungs clear."


# ---------------------------------------------------------------------------- the command
def test_prepare_commands_print_their_summary(iu_release, mimic_release, tmp_path):
    runner = CliRunner()
    done = runner.invoke(prepare_cli, [
        "iu-xray", "--reports", str(iu_release / "ecgen-radiology"),
        "--images", str(iu_release / "NLMCXR_png"), "--out", str(tmp_path / "iu")])
    assert done.exit_code == 0, done.output
    assert "studies: 10 (train 7, val 1, test 2)" in done.output
    assert "  no findings: 1" in done.output and "left out: 5" in done.output
    labels = json.loads((tmp_path / "iu" / "prepare_summary.json").read_text())["labels"]
    assert labels["Cardiomegaly"] == {"positive": 1, "uncertain": 0, "negative": 9}
    assert labels["Pneumothorax"]["negative"] == 9
    done = runner.invoke(prepare_cli, [
        "mimic-cxr", "--reports", str(mimic_release / "mimic-cxr-reports"),
        "--images", str(mimic_release / "mimic-cxr-jpg"),
        "--metadata", str(mimic_release / "mimic-cxr-2.0.0-metadata.csv"),
        "--split", str(mimic_release / "mimic-cxr-2.0.0-split.csv"),
        "--out", str(tmp_path / "mimic")])
    assert done.exit_code == 0, done.output
    assert "studies: 4 (train 2, val 1, test 1)" in done.output
    assert "  no report: 1" in done.output
    assert "Support Devices" in done.output


def test_prepare_command_refuses_bad_input_in_one_line(tmp_path):
    done = CliRunner().invoke(prepare_cli, ["iu-xray", "--reports", str(tmp_path / "none"),
                                            "--images", str(tmp_path), "--out", str(tmp_path)])
    assert done.exit_code == 2
    assert "reports" in done.output and "not a folder" in done.output
