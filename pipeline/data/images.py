"""One image decoder for training, evaluation and serving: film bytes -> (S, S) float32 in [0, 1].

Every path into the model goes through `decode_bytes`, so a file gives the same tensor in
training, evaluation and serving. What it reads and how it maps intensities to [0, 1]:

- 8-bit PNG/JPEG (modes L, RGB, RGBA, LA, P, 1, CMYK): gray by PIL's ITU-R 601 luma, value/255,
  as before this module existed. Transparent pixels read as black (alpha multiplies the gray):
  a film's background. JPEGs decode at a reduced scale first (`draft`), much faster on big films.
- More than 8 bits (16-bit PNG, 32-bit/float TIFF; PIL modes I;16*, I, F): a window between
  the 0.5th and 99.5th percentiles of the film's values (`WINDOW_PERCENTILES`), clipped (a
  film without contrast there reads as its value over 65535, or 1.0 for float films).
  Dividing by 65535 would leave a 12-bit film in 16-bit storage nearly black, and min-max
  lets one burnt-in marker decide the contrast.
- EXIF orientation is applied (`ImageOps.exif_transpose`) before anything else.
- DICOM (the `DICM` preamble), through pydicom: Modality LUT or RescaleSlope/Intercept, then
  the VOI LUT or Window Center/Width when the file carries one (scaled by that transform's
  output range), else the percentile window; MONOCHROME1 is inverted (white = low values).
  A multi-frame file is refused: which frame is the film is not ours to guess.
- Then a bilinear resize to S x S (a square: chest films are near-square, and the encoder's
  patch grid is).

Anything that fails raises `ImageDecodeError` (a ValueError) naming the file or request item.

`ImageCache` keeps decoded, resized films as .npy files keyed by the sha256 of the file's
bytes and the size, so later epochs and runs read 4*S*S bytes instead of decoding a film again.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

DECODER_VERSION = 1  # part of the cache folder's name: a change in decoding is a new cache
WINDOW_PERCENTILES = (0.5, 99.5)
CACHE_ENV = "REPORT_VLM_IMAGE_CACHE"  # "off" disables the cache; a folder moves it there
_DICOM_MAGIC = b"DICM"


class ImageDecodeError(ValueError):
    """A film that cannot be decoded; the message starts with the file or item it came from."""


class ImageTooLarge(ImageDecodeError):
    """A film over the caller's pixel limit (checked from the header, before decoding)."""


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (128-byte preamble, then 'DICM')."""
    return data[128:132] == _DICOM_MAGIC


def _window(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Percentile window to [0, 1]. A film with no contrast inside the window has none to
    stretch: it reads as its value over `full_scale` (the storage's white)."""
    low, high = np.percentile(array, WINDOW_PERCENTILES)
    if not high > low:
        return np.clip(array / full_scale, 0.0, 1.0).astype(np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float [0, 1] film (PIL mode F)."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"image too large: {width} x {height} pixels; at most "
                            f"{max_pixels} pixels")


def _gray8(image: Image.Image) -> Image.Image:
    """An 8-bit PIL image as mode L (alpha multiplies the gray)."""
    if image.mode == "P":  # a palette may carry transparency
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = image.getchannel("A")
        gray = image.convert("L")
        return Image.fromarray((np.asarray(gray, np.uint16) * np.asarray(alpha, np.uint16)
                                + 127) // 255).convert("L")
    return image.convert("L")


def _decode_pil(data: bytes, size: int, max_pixels: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as opened:
        _check_pixels(opened.width, opened.height, max_pixels)
        opened.draft("L", (size, size))  # JPEG: decode at a reduced scale
        image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I") or image.mode == "F":  # more than 8 bits
            full_scale = 1.0 if image.mode == "F" else 65535.0
            return _resize(_window(np.asarray(image, dtype=np.float32), full_scale), size)
        gray = _gray8(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(gray, dtype=np.float32) / 255.0


def _dicom_display(ds, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> [0, 1] display values (modality, VOI, MONOCHROME1)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        values = apply_voi_lut(np.rint(values).astype(np.int64), ds)  # a LUT takes integers
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        display = np.clip(values / (2 ** depth - 1), 0.0, 1.0).astype(np.float32)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # The output range of the window depends on bits stored and rescale: read it from
        # the transform itself, applied to values far below and above any window.
        low, high = apply_voi_lut(np.array([-1e30, 1e30]), ds)
        values = apply_voi_lut(values, ds)
        display = np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    else:
        display = _window(values, max(float(np.abs(values).max()), 1.0))
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        display = 1.0 - display
    return display


def _decode_dicom(data: bytes, size: int, max_pixels: int | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, KeyError) as exc:
        raise ValueError(f"not a readable DICOM file: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames) is not supported: export the "
                         "film as a single-frame file")
    if "PixelData" not in ds:
        raise ValueError("DICOM file without pixel data")
    _check_pixels(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    try:
        pixels = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:  # a compressed syntax without a plugin
        raise ValueError(f"cannot decode the DICOM pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): "
                         f"{exc}") from exc
    if pixels.ndim == 3:  # a colour DICOM: gray by the channel mean
        pixels = pixels.mean(axis=-1)
    return _resize(_dicom_display(ds, pixels), size)


def decode_bytes(data: bytes, size: int, name: str, max_pixels: int | None = None) -> np.ndarray:
    """A PNG/JPEG/DICOM film -> float32 (size, size) in [0, 1]; `name` appears in errors."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        decode = _decode_dicom if is_dicom(data) else _decode_pil
        return decode(data, size, max_pixels)
    except ImageDecodeError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, AttributeError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or unreadable image: {exc}") from exc


def decode_file(path: str | os.PathLike, size: int) -> np.ndarray:
    """`decode_bytes` of a file (no cache)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read: {exc}") from exc
    return decode_bytes(data, size, str(path))


def model_input(views: list[np.ndarray]) -> torch.Tensor:
    """Decoded views of one study -> the model's (1, S, S) input: mean 0.5 / std 0.5
    normalisation, views averaged."""
    image = (np.mean(views, axis=0) - 0.5) / 0.5
    return torch.from_numpy(image[None].astype(np.float32))


def _verify_dicom(path: str) -> str:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, KeyError, ValueError) as exc:
        return f"corrupt or unreadable DICOM file {path}: {exc}"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM {path} ({frames} frames) is not supported"
    return ""


def verify_file(path: str) -> str:
    """'' when `path` looks like a decodable film (header checked, not decoded), else why not."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        return f"cannot read image {path}: {exc}"
    if not head:
        return f"empty image file {path}"
    if is_dicom(head):
        return _verify_dicom(path)
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"corrupt or unreadable image {path}: {exc}"
    if fmt == "JPEG":  # verify() does not read JPEG data; a cut file lacks its end marker
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 1024))
            if b"\xff\xd9" not in handle.read():
                return f"corrupt image {path}: truncated JPEG (no end-of-image marker)"
    return ""


def cache_dir_for(data_root: str | os.PathLike) -> str | None:
    """Where the films of the data set in `data_root` are cached; None when caching is off.

    `<data_root>/.image_cache` when that folder is writable, else a folder per data set under
    the user's cache (~/.cache/mamba-report-vlm/images). REPORT_VLM_IMAGE_CACHE=off turns
    caching off; any other value is a folder that holds one sub-folder per data set.
    """
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    root = os.path.abspath(data_root)
    tag = f"{Path(root).name}-{hashlib.sha256(root.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    if setting:
        return os.path.join(setting, tag)
    if os.access(root, os.W_OK):
        return os.path.join(root, ".image_cache")
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user, "mamba-report-vlm", "images", tag)


class ImageCache:
    """Decoded films of one data set at one size, as .npy files keyed by content hash."""

    def __init__(self, folder: str | os.PathLike, size: int):
        self.folder = Path(folder) / f"v{DECODER_VERSION}_{size}px"
        self.size = size
        # A file's identity -> sha256, so a film is hashed once a run. The inode and ctime are
        # part of it: a film replaced with its byte size and mtime kept (`cp -p` writes in
        # place, `rsync -a` renames a new file over it) changes one or the other, and the
        # ctime cannot be set back.
        self._digests: dict[tuple, str] = {}

    def _digest(self, path: str) -> tuple[str, bytes | None]:
        stat = os.stat(path)
        key = (path, stat.st_dev, stat.st_ino, stat.st_ctime_ns, stat.st_mtime_ns, stat.st_size)
        if key in self._digests:
            return self._digests[key], None
        data = Path(path).read_bytes()
        self._digests[key] = hashlib.sha256(data).hexdigest()
        return self._digests[key], data

    def load(self, path: str) -> np.ndarray:
        """The film at `path` decoded at this cache's size: from the cache, or decoded once."""
        try:
            digest, data = self._digest(path)
        except OSError as exc:
            raise ImageDecodeError(f"{path}: cannot read: {exc}") from exc
        target = self.folder / digest[:2] / f"{digest}.npy"
        try:
            array = np.load(target, allow_pickle=False)
            if array.shape == (self.size, self.size) and array.dtype == np.float32:
                return array
        except (OSError, ValueError):  # absent, or cut short by a crash: decode again
            pass
        if data is None:
            data = Path(path).read_bytes()
        array = decode_bytes(data, self.size, path)
        self._store(target, array)
        return array

    def _store(self, target: Path, array: np.ndarray) -> None:
        # Written to a temporary file and renamed: a reader (another rank, a crash) never
        # sees half a file. A cache that cannot be written only costs speed.
        temporary = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp",
                                             delete=False) as handle:
                temporary = handle.name
                np.save(handle, array, allow_pickle=False)
            os.replace(temporary, target)
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
