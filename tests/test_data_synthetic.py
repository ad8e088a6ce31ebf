"""The synthetic benchmark: determinism, layout, report lengths, coverage, caching, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.config import DataConfig
from pipeline.data import FINDINGS, DataError, generate_synthetic, load_dataset, load_records
from pipeline.data.synthetic import Study, draw_study, main, sample_study, write_report

TINY = {"n_train": 12, "n_val": 4, "n_test": 4, "image_size": 32}


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    a = _tree(generate_synthetic(tmp_path / "a", seed=5, **TINY).parent)
    b = _tree(generate_synthetic(tmp_path / "b", seed=5, **TINY).parent)
    c = _tree(generate_synthetic(tmp_path / "c", seed=6, **TINY).parent)
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotation.json"] != c["annotation.json"]
    assert a["images/SYN-00000/0.png"] != c["images/SYN-00000/0.png"]


def test_r2gen_layout_split_sizes_and_labels(tmp_path):
    path = generate_synthetic(tmp_path, seed=0, **TINY)
    data = json.loads(path.read_text())
    assert {k: len(v) for k, v in data.items()} == {"train": 12, "val": 4, "test": 4}
    for entry in data["train"]:
        assert (tmp_path / "images" / entry["image_path"][0]).is_file()
        assert set(entry["labels"]) == set(FINDINGS)
    records = load_records(path)
    assert {k: len(v) for k, v in records.items()} == {"train": 12, "val": 4, "test": 4}
    assert all(r.labels is not None for r in records["test"])


@pytest.mark.parametrize("version", [1, 2])
def test_default_size_set_covers_every_finding_with_reports_of_20_to_90_words(tmp_path, version):
    path = generate_synthetic(tmp_path, seed=0, image_size=16, version=version)  # any size
    entries = [e for split in json.loads(path.read_text()).values() for e in split]
    assert len(entries) == 254 + 32 + 64
    assert all(20 <= len(e["report"].split()) <= 90 for e in entries)
    from pipeline.data.labeler import coarse_group
    version_1 = {"cardiomegaly", "effusion", "pneumothorax", "nodule", "consolidation"}
    for finding in FINDINGS[:-1]:
        drawn = sum(e["labels"][finding] for e in entries)
        assert (drawn > 0) == (version == 2 or coarse_group(finding) in version_1), finding


def test_versions_differ_and_version_1_never_hedges(tmp_path):
    one = json.loads(generate_synthetic(tmp_path / "1", seed=0, version=1, **TINY).read_text())
    two = json.loads(generate_synthetic(tmp_path / "2", seed=0, version=2, **TINY).read_text())
    assert one != two
    hedges = ("possible", "may represent", "may reflect", "cannot", "questionable", "borderline")
    for version in (1, 2):
        reports = [write_report(sample_study(rng, version), rng, version).lower()
                   for rng in (np.random.default_rng([0, i]) for i in range(300))]
        hedged = sum(any(h in r for h in hedges) for r in reports)
        assert (hedged > 30) if version == 2 else (hedged == 0), (version, hedged)


def test_report_lengths_over_many_studies():
    lengths = [len(write_report(sample_study(rng, v), rng, v).split())
               for v in (1, 2)
               for rng in (np.random.default_rng([s, i]) for s in range(3) for i in range(1000))]
    assert 20 <= min(lengths) and max(lengths) <= 90


def test_reports_do_not_depend_on_image_size(tmp_path):
    small = json.loads(generate_synthetic(tmp_path / "s", seed=1, **TINY).read_text())
    large = json.loads(generate_synthetic(tmp_path / "l", seed=1, **{**TINY, "image_size": 48})
                       .read_text())
    assert small == large


@pytest.mark.parametrize("study, sign, rows, cols", [
    (Study(True, (), None, None, None), 1, "lower", "right"),  # heart grows to patient left
    (Study(False, ("left",), None, None, None, "moderate"), 1, "lower", "right"),
    (Study(False, ("right",), None, None, None, "moderate"), 1, "lower", "left"),
    (Study(False, (), "right", None, None, "small", "moderate"), -1, "upper", "left"),
    (Study(False, (), "left", None, None, "small", "moderate"), -1, "upper", "right"),
    (Study(False, (), None, ("right", "upper", 20), None), 1, "upper", "left"),
    (Study(False, (), None, ("left", "lower", 40), None), 1, "lower", "right"),
    (Study(False, (), None, None, ("right", "lower")), 1, "lower", "left"),
    (Study(False, (), None, None, ("left", "upper")), 1, "upper", "right"),
])
def test_each_finding_is_visible_where_the_report_puts_it(study, sign, rows, cols):
    """Same patient with and without the finding: the change lies on the stated side and half.

    Patient left is the image right; pneumothorax darkens, everything else brightens.
    """
    size, normal = 64, Study(False, (), None, None, None)
    for seed in range(4):
        diff = sign * (draw_study(study, size, np.random.default_rng(seed)).astype(np.int16)
                       - draw_study(normal, size, np.random.default_rng(seed)))
        ys, xs = np.nonzero(diff > 12)
        assert len(ys) > 5, f"{study} not visible (seed {seed})"
        assert (np.mean(ys) > size / 2) == (rows == "lower"), (study, seed, np.mean(ys))
        assert (np.mean(xs) > size / 2) == (cols == "right"), (study, seed, np.mean(xs))


def _change(study: Study, seed: int, size: int = 64) -> np.ndarray:
    normal = Study(False, (), None, None, None)
    return (draw_study(study, size, np.random.default_rng(seed)).astype(np.int16)
            - draw_study(normal, size, np.random.default_rng(seed)))


@pytest.mark.parametrize("study, cols", [
    (Study(False, (), None, None, None, atelectasis="left"), "right"),
    (Study(False, (), None, None, None, atelectasis="right"), "left"),
    (Study(False, (), None, None, None, opacity="left"), "right"),
    (Study(False, (), None, None, None, opacity="right"), "left"),
    (Study(False, (), None, None, None, fracture="left"), "right"),
    (Study(False, (), None, None, None, fracture="right"), "left"),
    (Study(False, (), None, None, None, devices=("pacemaker",)), "right"),  # left chest wall
    (Study(False, (), None, None, None, devices=("line",)), "left"),  # right jugular
])
def test_v2_sided_findings_brighten_the_stated_side(study, cols):
    for seed in range(4):
        ys, xs = np.nonzero(_change(study, seed) > 12)
        assert len(ys) > 3, f"{study} not visible (seed {seed})"
        assert (np.mean(xs) > 32) == (cols == "right"), (study, seed, np.mean(xs))


@pytest.mark.parametrize("study", [
    Study(False, (), None, None, None, mediastinum=True),
    Study(False, (), None, None, None, edema=True),
    Study(False, (), None, None, None, devices=("tube",)),
])
def test_v2_midline_and_bilateral_findings_are_visible_near_the_middle(study):
    for seed in range(4):
        ys, xs = np.nonzero(_change(study, seed) > 12)
        assert len(ys) > 5, f"{study} not visible (seed {seed})"
        assert abs(np.mean(xs) - 32) < 10, (study, seed, np.mean(xs))


def test_v2_reports_hedge_some_findings_and_chexpert_reads_them_as_uncertain():
    from pipeline.data.chexpert import UNCERTAIN, label_chexpert
    uncertain = 0
    for i in range(400):
        rng = np.random.default_rng([0, i])
        report = write_report(sample_study(rng, 2), rng, 2)
        uncertain += UNCERTAIN in label_chexpert(report).values()
    assert 0.1 < uncertain / 400 < 0.5, uncertain


def test_cached_set_is_not_regenerated(tmp_path):
    path = generate_synthetic(tmp_path, seed=0, **TINY)
    png = tmp_path / "images" / "SYN-00000" / "0.png"
    stamp = png.stat().st_mtime_ns
    assert generate_synthetic(tmp_path, seed=0, **TINY) == path
    assert png.stat().st_mtime_ns == stamp
    generate_synthetic(tmp_path, seed=1, **TINY)  # other arguments: regenerated
    assert json.loads((tmp_path / "synthetic_meta.json").read_text())["seed"] == 1


def test_incomplete_set_is_regenerated(tmp_path):
    generate_synthetic(tmp_path, seed=0, **TINY)
    (tmp_path / "images" / "SYN-00003" / "0.png").unlink()
    generate_synthetic(tmp_path, seed=0, **TINY)
    assert (tmp_path / "images" / "SYN-00003" / "0.png").is_file()


def test_cli_writes_the_set(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["--out", str(out), "--seed", "2", "--n-train", "3",
                                       "--n-val", "1", "--n-test", "1", "--image-size", "24"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "annotation.json")
    assert len(load_records(out / "annotation.json")["train"]) == 3


def test_load_dataset_synthetic_with_subsets(tmp_path):
    cfg = DataConfig(root=str(tmp_path), max_train=5, max_val=2, **TINY)
    records = load_dataset(cfg)
    assert [len(records[s]) for s in ("train", "val", "test")] == [5, 2, 4]
    assert [r.id for r in records["train"]] == [f"SYN-{i:05d}" for i in range(5)]
    assert (tmp_path / "synthetic_s0_12_4_4_32" / "annotation.json").is_file()
    with pytest.raises(DataError, match="train split is empty"):
        load_dataset(DataConfig(root=str(tmp_path), max_train=0, **TINY))


def test_data_synthetic_v2_names_version_2_in_its_own_folder(tmp_path):
    one = load_dataset(DataConfig(root=str(tmp_path), **TINY))
    two = load_dataset(DataConfig(source="synthetic-v2", root=str(tmp_path), **TINY))
    meta = json.loads((tmp_path / "synthetic-v2_s0_12_4_4_32" / "synthetic_meta.json").read_text())
    assert meta["version"] == 2
    assert [r.report for r in one["train"]] != [r.report for r in two["train"]]


def test_v2_reports_read_the_same_by_both_labelers():
    """Each coarse group of a study is what the CheXpert-14 labeler reads for its observation
    (positive or uncertain): the benchmark exercises the label space papers report on. Lung
    Opacity is CheXpert's parent of every opacity (edema's haziness, consolidation), so only
    the hazy-opacity group implies it; a hedged "cannot exclude pneumonia" is Pneumonia."""
    from pipeline.data.chexpert import POSITIVE, UNCERTAIN, label_chexpert
    from pipeline.data.labeler import CHEXPERT_OF, COARSE_FINDINGS, to_coarse
    disagree = []
    for i in range(300):
        rng = np.random.default_rng([0, i])
        study = sample_study(rng, 2)
        report = write_report(study, rng, 2)
        read = label_chexpert(report)
        coarse = to_coarse(study.labels())
        for group in COARSE_FINDINGS[:-1]:
            observations = [CHEXPERT_OF[group]] + ["Pneumonia"] * (group == "consolidation")
            found = any(read[name] in (POSITIVE, UNCERTAIN) for name in observations)
            if coarse[group] != found and not (group == "opacity" and found):
                disagree.append((group, report))
    assert not disagree, disagree[:5]
