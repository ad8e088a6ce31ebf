"""The one film decoder: formats, bit depths, DICOM, bad files, the same tensor everywhere, cache."""
from __future__ import annotations

import base64
import gc
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DataError, ImageReportDataset, image_batches, load_records
from pipeline.data import images as film
from pipeline.data.images import ImageDecodeError, decode_bytes, decode_file
from pipeline.evaluate.serving import decode_image

SIZE = 16


def _gradient(bits: int, low: int, high: int, shape=(40, 32)) -> np.ndarray:
    """A left-to-right ramp from `low` to `high` (a film with contrast)."""
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.tile(np.linspace(low, high, shape[1]), (shape[0], 1)).round().astype(dtype)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
           slope: float = 1.0, intercept: float = 0.0, window: tuple | None = None,
           frames: int = 1) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- formats
def test_8bit_png_is_value_over_255_as_before(tmp_path):
    path = _save(tmp_path / "a.png", Image.new("L", (SIZE, SIZE), 51))
    assert np.allclose(decode_file(path, SIZE), 51 / 255)


def test_16bit_png_is_windowed_not_divided_by_65535(tmp_path):
    # A 12-bit film in 16-bit storage: /65535 would leave it under 0.0625, nearly black.
    path = _save(tmp_path / "a.png", Image.fromarray(_gradient(16, 0, 4095)))
    array = decode_file(path, SIZE)
    assert array.min() < 0.05 and array.max() > 0.95
    assert np.all(np.diff(array, axis=1) >= 0)  # the ramp stays a ramp


def test_16bit_window_ignores_a_burnt_in_marker(tmp_path):
    pixels = _gradient(16, 1000, 2000, shape=(64, 64))
    pixels[:2, :2] = 65535  # a marker: 4 of 4096 pixels, under the 99.5th percentile
    array = decode_file(_save(tmp_path / "m.png", Image.fromarray(pixels)), 64)
    assert np.median(array) == pytest.approx(0.5, abs=0.05)


def test_jpeg_rgb_rgba_and_palette_read_as_gray(tmp_path):
    gray = _gradient(8, 0, 255)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    expected = decode_file(_save(tmp_path / "l.png", Image.fromarray(gray)), SIZE)
    for name, image, kwargs in [("rgb.png", rgb, {}), ("p.png", rgb.convert("P"), {}),
                                ("rgba.png", rgb.convert("RGBA"), {}),
                                ("j.jpg", rgb, {"quality": 95})]:
        array = decode_file(_save(tmp_path / name, image, **kwargs), SIZE)
        assert array.shape == (SIZE, SIZE) and array.dtype == np.float32
        assert np.abs(array - expected).max() < 0.05, name
    transparent = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 0))
    assert decode_file(_save(tmp_path / "t.png", transparent), SIZE).max() == 0.0


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the white half belongs on the right
    array = decode_file(_save(tmp_path / "r.jpg", image, exif=exif, quality=95), SIZE)
    assert array[:, -4:].mean() > 0.9 and array[:, :4].mean() < 0.1


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_and_photometric_interpretation(tmp_path, photometric):
    stored = _gradient(16, 0, 4095)
    path = _dicom(tmp_path / "a.dcm", stored, photometric, slope=2.0, intercept=-1024.0)
    array = decode_file(path, SIZE)
    left, right = array[:, :3].mean(), array[:, -3:].mean()
    # MONOCHROME2: low values are black; MONOCHROME1 the reverse.
    assert (left < 0.1 and right > 0.9) if photometric == "MONOCHROME2" else (left > 0.9 and right < 0.1)


def test_dicom_window_center_width_is_applied_after_rescale(tmp_path):
    stored = _gradient(16, 0, 4095)
    # Rescaled values run -1024..7166; a window of 0..1000 saturates most of the film.
    path = _dicom(tmp_path / "w.dcm", stored, slope=2.0, intercept=-1024.0, window=(500, 1000))
    array = decode_file(path, 64)
    assert (array >= 0.999).mean() > 0.6 and (array <= 0.001).mean() > 0.05


def test_dicom_multiframe_is_refused_naming_the_file(tmp_path):
    path = _dicom(tmp_path / "cine.dcm", np.stack([_gradient(16, 0, 4095)] * 2), frames=2)
    with pytest.raises(ImageDecodeError, match=r"cine\.dcm.*multi-frame"):
        decode_file(path, SIZE)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"\x00" * 128 + b"DICM"])
def test_corrupt_or_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="broken.png"):
        decode_file(path, SIZE)


def test_loader_names_every_broken_film_in_one_error(tmp_path):
    root = tmp_path / "ds"
    _save(root / "images/ok/0.png", Image.new("L", (8, 8), 9))
    (root / "images/empty").mkdir(parents=True)
    (root / "images/empty/0.png").write_bytes(b"")
    _dicom(root / "images/cine/0.dcm", np.stack([_gradient(16, 0, 9)] * 3), frames=3)
    _dicom(root / "images/single/0.dcm", _gradient(16, 0, 4095))
    entries = [{"id": i, "report": "No effusion.", "image_path": [f"{i}/0.{ext}"]}
               for i, ext in [("ok", "png"), ("empty", "png"), ("cine", "dcm"), ("single", "dcm")]]
    (root / "annotation.json").write_text(json.dumps({"train": entries}))
    with pytest.raises(DataError) as info:
        load_records(root / "annotation.json")
    message = str(info.value)
    assert "2 problem(s)" in message and "empty/0.png" in message and "cine/0.dcm" in message
    assert "multi-frame" in message and "single" not in message


# ----------------------------------------------------------------------------- one tensor
def test_the_same_file_gives_the_same_tensor_in_training_evaluation_and_serving(
        tmp_path, monkeypatch):
    root = tmp_path / "ds"
    rgb = np.stack([_gradient(8, 10, 240, shape=(300, 200))] * 3, axis=-1)
    films = {"j": _save(root / "images/j/0.jpg", Image.fromarray(rgb), quality=90),
             "p": _save(root / "images/p/0.png", Image.fromarray(_gradient(16, 0, 4095))),
             "d": _dicom(root / "images/d/0.dcm", _gradient(16, 0, 4095), "MONOCHROME1")}
    entries = [{"id": k, "report": "No effusion.", "image_path": [str(p.relative_to(root / "images"))]}
               for k, p in films.items()]
    (root / "annotation.json").write_text(json.dumps({"train": entries}))
    records = load_records(root / "annotation.json")["train"]
    monkeypatch.delenv("REPORT_VLM_IMAGE_ROOT", raising=False)
    for _ in range(2):  # the second pass reads the film cache
        training = [ImageReportDataset(records, SIZE)[i]["image"] for i in range(len(records))]
        evaluation = torch.cat(list(image_batches(records, SIZE, batch_size=2)))
        for i, path in enumerate(films.values()):
            served = decode_image(base64.b64encode(path.read_bytes()).decode(), SIZE)
            in_process = decode_image(str(path), SIZE, any_path=True)
            assert torch.equal(training[i], evaluation[i])
            assert torch.equal(training[i], served) and torch.equal(served, in_process)


# ----------------------------------------------------------------------------- cache
def test_a_second_load_reads_the_cache_instead_of_decoding(tmp_path, monkeypatch):
    monkeypatch.delenv(film.CACHE_ENV, raising=False)
    root = tmp_path / "ds"
    _save(root / "images/a/0.png", Image.fromarray(_gradient(16, 0, 4095)))
    _save(root / "images/b/0.png", Image.new("L", (30, 30), 77))
    entries = [{"id": i, "report": "No effusion.", "image_path": [f"{i}/0.png"]} for i in "ab"]
    (root / "annotation.json").write_text(json.dumps({"train": entries}))
    decoded = []
    real = film.decode_bytes
    monkeypatch.setattr(film, "decode_bytes", lambda data, size, name, **kw: decoded.append(name)
                        or real(data, size, name, **kw))
    first = torch.stack(list(ImageReportDataset(load_records(root / "annotation.json")["train"],
                                                SIZE)[i]["image"] for i in range(2)))
    assert len(decoded) == 2
    assert len(list((root / ".image_cache").rglob("*.npy"))) == 2
    # A later run: new records, new dataset objects, same films.
    again = ImageReportDataset(load_records(root / "annotation.json")["train"], SIZE)
    assert torch.equal(torch.stack([again[0]["image"], again[1]["image"]]), first)
    assert len(decoded) == 2  # nothing decoded again
    ImageReportDataset(load_records(root / "annotation.json")["train"], SIZE * 2)[0]
    assert len(decoded) == 3  # another size is another cache


def test_a_film_replaced_with_its_size_and_mtime_kept_is_read_anew(tmp_path, monkeypatch):
    """`cp -p` / `rsync -a` of another film of the same byte size keeps the old mtime: the
    cache's memo must not hand back the film that was there before."""
    monkeypatch.delenv(film.CACHE_ENV, raising=False)
    path = tmp_path / "ds" / "0.png"
    path.parent.mkdir(parents=True)
    dark, light = (np.full((32, 32), v, np.uint8) for v in (10, 240))
    buffers = []
    for pixels in (dark, light):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        buffers.append(out.getvalue())
    assert len(buffers[0]) == len(buffers[1])  # the same byte size
    cache = film.ImageCache(tmp_path / "cache", SIZE)
    path.write_bytes(buffers[0])
    stamp = path.stat().st_mtime_ns
    first = cache.load(str(path))
    time.sleep(0.05)  # past the file system's timestamp tick
    path.write_bytes(buffers[1])  # in place (`cp -p` keeps the inode) ...
    os.utime(path, ns=(stamp, stamp))  # ... and the mtime
    second = cache.load(str(path))
    assert second.mean() > first.mean() + 0.5, "the cache handed back the film replaced"
    replaced = tmp_path / "ds" / "1.png"  # `rsync -a`: a new file renamed over the old one
    replaced.write_bytes(buffers[0])
    os.utime(replaced, ns=(stamp, stamp))
    os.replace(replaced, path)
    assert np.array_equal(cache.load(str(path)), first)


def test_loader_workers_decode_each_film_once_over_the_epochs(tmp_path, monkeypatch):
    """Two DataLoader workers (as on a GPU), three epochs: every film is decoded once in the
    first epoch, in whichever worker, and read from the cache after that."""
    from pipeline.train.common import EpochLoaders

    monkeypatch.delenv(film.CACHE_ENV, raising=False)
    root = tmp_path / "ds"
    entries = []
    for i in range(7):
        _save(root / f"images/{i}/0.png", Image.fromarray(_gradient(8, 10 * i, 200)))
        entries.append({"id": str(i), "report": "No effusion.", "image_path": [f"{i}/0.png"]})
    (root / "annotation.json").write_text(json.dumps({"train": entries[:6], "val": entries[6:]}))
    decoded = tmp_path / "decoded.txt"  # workers are other processes: they append here
    real = film.decode_bytes

    def counted(data, size, name, **kw):
        with open(decoded, "a") as out:
            out.write(f"{name}\n")
        return real(data, size, name, **kw)

    monkeypatch.setattr(film, "decode_bytes", counted)  # forked workers inherit it
    records = load_records(root / "annotation.json")
    loaders = EpochLoaders(records["train"], records["val"], SIZE, batch_size=2, seed=0,
                           num_workers=2)
    per_epoch = []
    for epoch in (1, 2, 3):
        seen = sum(len(batch["reports"]) for batch in loaders.epoch(epoch))
        assert seen == 6
        lines = decoded.read_text().splitlines() if decoded.exists() else []
        per_epoch.append(len(lines) - sum(per_epoch))
    del loaders  # its persistent workers end here, not in a later test's garbage collection
    gc.collect()
    assert per_epoch == [6, 0, 0], f"decodes per epoch: {per_epoch}"
    assert len(set(decoded.read_text().splitlines())) == 6


def test_cache_can_be_turned_off_or_moved(tmp_path, monkeypatch):
    monkeypatch.setenv(film.CACHE_ENV, "off")
    assert film.cache_dir_for(tmp_path) is None
    monkeypatch.setenv(film.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert film.cache_dir_for(tmp_path).startswith(str(tmp_path / "elsewhere"))


def test_decode_bytes_refuses_a_film_over_the_pixel_limit_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (100, 100)).save(buffer, format="PNG")
    with pytest.raises(film.ImageTooLarge, match="100 x 100"):
        decode_bytes(buffer.getvalue(), SIZE, "req", max_pixels=99 * 99)
