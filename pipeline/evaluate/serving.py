"""MLflow pyfunc wrappers: registry versions hold our checkpoint, not a pickled model.

Input for both: a DataFrame (or list of dicts) with a column `image` holding a base64-encoded
PNG/JPEG, or a file path when the environment variable `REPORT_VLM_IMAGE_ROOT` names a folder
(paths are then confined to it). `report-vlm` versions reference the LLM by name (`llm` in the
checkpoint's config) rather than carrying a copy of its weights.

A request the model cannot answer raises `BadRequest` with the reason: in-process a ValueError,
under `mlflow models serve` a 400 whose `message` says why (any other exception reaches the
client as MLflow's generic "unexpected error", the reason buried in a stack trace). Limits keep
one request from holding the server: at most `MAX_IMAGES` images and `MAX_REQUEST_MB` of image
text per request, `MAX_PIXELS` per image, `MAX_FILE_MB` per file named by path, and bounded
generation params.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_IMAGES = 32
MAX_REQUEST_MB = 16  # base64 text of all images of one request; a 12 MB film still fits
MAX_PIXELS = 50_000_000  # a 7000 x 7000 film; checked from the header, before decoding
MAX_FILE_MB = 64  # an image file named by path; read no further than this
PARAM_RANGES = {"num_beams": (1, 8), "max_new_tokens": (0, 1024)}  # max_new_tokens 0 = default


class BadRequest(MlflowException, ValueError):
    """A request the model cannot answer; the scoring server returns it as a 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _to_frame(model_input):
    import pandas as pd

    try:
        if isinstance(model_input, pd.DataFrame):
            frame = model_input
        elif isinstance(model_input, dict):
            frame = pd.DataFrame({k: v if isinstance(v, list) else [v]
                                  for k, v in model_input.items()})
        else:
            frame = pd.DataFrame(list(model_input))
    except (TypeError, ValueError) as exc:
        raise BadRequest("input must be records with an `image` (path or base64 PNG/JPEG), "
                         f"got {type(model_input).__name__}") from exc
    if "image" not in frame.columns or frame.empty:
        raise BadRequest("input needs at least one record with an `image` (path or base64 "
                         "PNG/JPEG)")
    if len(frame) > MAX_IMAGES:
        raise BadRequest(f"{len(frame)} images in one request; at most {MAX_IMAGES}")
    size = sum(len(v) for v in frame["image"] if isinstance(v, (str, bytes)))
    if size > MAX_REQUEST_MB * 2**20:
        raise BadRequest(f"the request's images take {size / 2**20:.1f} MB; at most "
                         f"{MAX_REQUEST_MB} MB per request")
    return frame


def generation_params(params) -> dict[str, int]:
    """`num_beams` / `max_new_tokens` as ints inside PARAM_RANGES, else BadRequest."""
    params = params or {}
    out = {}
    for name, default in (("num_beams", 1), ("max_new_tokens", 0)):
        value = params.get(name, default)
        low, high = PARAM_RANGES[name]
        try:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise BadRequest(f"param {name} must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise BadRequest(f"param {name} must be in [{low}, {high}], got {number}")
        out[name] = number
    return out


IMAGE_ROOT_ENV = "REPORT_VLM_IMAGE_ROOT"  # set to a folder to accept file paths under it
_NOT_AN_IMAGE = "`image` must be an existing file path or a base64 PNG/JPEG"


def _open_bytes(data: bytes):
    """The decoded image, None when the bytes are not an image; BadRequest when too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    if image.width * image.height > MAX_PIXELS:
        raise BadRequest(f"image too large: {image.width} x {image.height} pixels; at most "
                         f"{MAX_PIXELS} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError):  # truncated or corrupt data
        return None
    return image


def _allowed_path(text: str, image_root: str | None) -> Path:
    """`text` as a file under `image_root`; refused when paths are off or it escapes the root."""
    if not image_root:
        raise BadRequest(f"{_NOT_AN_IMAGE}: it is not valid base64 of an image, and file paths "
                         f"are not accepted (set {IMAGE_ROOT_ENV} to a folder to allow them)")
    root = Path(image_root).resolve()
    try:
        path = (root / text).resolve()
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{_NOT_AN_IMAGE}: not a usable path") from exc
    if not path.is_relative_to(root):
        raise BadRequest(f"{_NOT_AN_IMAGE}: paths are accepted only under {IMAGE_ROOT_ENV}")
    if not path.is_file():
        raise BadRequest(f"{_NOT_AN_IMAGE}: no such file under {IMAGE_ROOT_ENV}")
    return path


def _read_capped(path: Path) -> bytes:
    """A file's bytes; BadRequest when it holds more than MAX_FILE_MB (never read whole)."""
    cap = MAX_FILE_MB * 2**20
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise BadRequest(f"image file too large: over {MAX_FILE_MB} MB; at most {MAX_FILE_MB} MB")
    return data


def decode_image(value: str, image_size: int, image_root: str | None = None) -> torch.Tensor:
    """A base64 PNG/JPEG (or, under `image_root` only, a file path) -> tensor (1, S, S).

    Base64 is tried first and a path is never touched unless `image_root` allows paths: a
    224x224 PNG is ~67 KB of base64, far too long for a file name, and a server must not tell
    clients which of its files exist.
    """
    from PIL import Image

    if not isinstance(value, (str, bytes)):
        raise BadRequest(f"{_NOT_AN_IMAGE}, got {type(value).__name__}")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        data = None
    image = _open_bytes(data) if data else None
    if image is None:
        if data and not image_root:
            raise BadRequest(f"{_NOT_AN_IMAGE}: the base64 decodes to {len(data)} bytes that "
                             "are not a PNG/JPEG")
        path = _allowed_path(text, image_root)
        image = _open_bytes(_read_capped(path))
        if image is None:
            raise BadRequest(f"{_NOT_AN_IMAGE}: {text!r} is not a PNG/JPEG")
    image = image.convert("L").resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).unsqueeze(0)


def _images(frame, image_size: int) -> torch.Tensor:
    root = os.environ.get(IMAGE_ROOT_ENV) or None
    return torch.stack([decode_image(v, image_size, root) for v in frame["image"]])


class VisionBridgePyfunc(mlflow.pyfunc.PythonModel):
    """Images -> pooled visual features (one vector per image)."""

    def load_context(self, context):
        from pipeline import config as C
        from pipeline.models.loading import load_vision_bridge

        self.model, self.metadata, self.cfg = load_vision_bridge(
            context.artifacts["checkpoint"], C.Stage1Config())

    def predict(self, context, model_input, params=None):
        frame = _to_frame(model_input)
        size = self.cfg.encoder.image_size
        images = _images(frame, size)
        with torch.no_grad():
            tokens = self.model(images)
        return tokens.mean(dim=1).numpy().tolist()


class ReportVLMPyfunc(mlflow.pyfunc.PythonModel):
    """Images -> generated reports. Params: `num_beams`, `max_new_tokens`."""

    def load_context(self, context):
        from pipeline.models.loading import load_report_model

        self.report_model = load_report_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        chosen = generation_params(params)
        frame = _to_frame(model_input)
        size = self.report_model.cfg.encoder.image_size
        images = _images(frame, size)
        return self.report_model.generate(images, num_beams=chosen["num_beams"],
                                          max_new_tokens=chosen["max_new_tokens"] or None)
