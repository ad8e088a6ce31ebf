"""MLflow pyfunc wrappers: registry versions hold our checkpoint, not a pickled model.

Input for both: a DataFrame (or list of dicts) with a column `image` holding a base64-encoded
PNG/JPEG/DICOM or a file path. Films are decoded by `pipeline.data.images`, the decoder training
and evaluation use, so a file gives the model the same tensor everywhere. `report-vlm` versions
reference the LLM by name (`llm` in the checkpoint's config) rather than carrying a copy of
its weights.

In-process (`mlflow.pyfunc.load_model(...).predict`) any number of rows is scored, `CHUNK_ROWS`
at a time (memory holds one chunk of films), and file paths are read; when
`REPORT_VLM_IMAGE_ROOT` names a folder, paths are confined to it.

Under `mlflow models serve` (MLflow marks its scoring server's environment) limits keep one
request from holding the server: at most `MAX_IMAGES` images and `MAX_REQUEST_MB` of image
text per request, and file paths only under `REPORT_VLM_IMAGE_ROOT`. Everywhere: `MAX_PIXELS`
per image, `MAX_FILE_MB` per file named by path, and bounded generation params. A request the model cannot answer raises
`BadRequest` with the reason: in-process a ValueError, served a 400 whose `message` says why
(any other exception reaches the client as MLflow's generic "unexpected error", the reason
buried in a stack trace).
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.device import resolve_device, to_device, to_storage

MAX_IMAGES = 32  # per served request
CHUNK_ROWS = 32  # rows decoded and generated at a time
MAX_REQUEST_MB = 16  # base64 text of all images of one request; a 12 MB film still fits
MAX_PIXELS = 50_000_000  # a 7000 x 7000 film; checked from the header, before decoding
MAX_FILE_MB = 64  # an image file named by path; read no further than this
PARAM_RANGES = {"num_beams": (1, 8), "max_new_tokens": (0, 1024)}  # max_new_tokens 0 = default


class BadRequest(MlflowException, ValueError):
    """A request the model cannot answer; the scoring server returns it as a 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def in_scoring_server() -> bool:
    """True inside `mlflow models serve` (and MLflow's simulated serving environment)."""
    try:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    except ImportError:  # fail closed: an MLflow without the marker gets the server's limits
        return True
    return bool(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.get())


def _to_frame(model_input, served: bool):
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
    if not served:
        return frame
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


IMAGE_ROOT_ENV = "REPORT_VLM_IMAGE_ROOT"  # a folder: file paths are accepted under it only
_NOT_AN_IMAGE = "`image` must be an existing file path or a base64 PNG/JPEG/DICOM"


def _decode(data: bytes, image_size: int, name: str):
    """The decoded film, None when the bytes are not a film; BadRequest when too large."""
    from pipeline.data.images import ImageDecodeError, ImageTooLarge, decode_bytes

    try:
        return decode_bytes(data, image_size, name, max_pixels=MAX_PIXELS)
    except ImageTooLarge as exc:
        raise BadRequest(str(exc)) from None
    except ImageDecodeError:
        return None


def _allowed_path(text: str, image_root: str | None, any_path: bool) -> Path:
    """`text` as a file (under `image_root` when one is set); refused when paths are off or
    it escapes the root."""
    if not image_root and not any_path:
        raise BadRequest(f"{_NOT_AN_IMAGE}: it is not valid base64 of an image, and file paths "
                         f"are not accepted (set {IMAGE_ROOT_ENV} to a folder to allow them)")
    root = Path(image_root).resolve() if image_root else Path.cwd()
    try:
        path = (root / text).resolve()
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{_NOT_AN_IMAGE}: not a usable path") from exc
    if image_root and not path.is_relative_to(root):
        raise BadRequest(f"{_NOT_AN_IMAGE}: paths are accepted only under {IMAGE_ROOT_ENV}")
    try:
        exists = path.is_file()
    except OSError:  # a name too long for the file system, ...
        exists = False
    if not exists:
        where = f" under {IMAGE_ROOT_ENV}" if image_root else ""
        raise BadRequest(f"{_NOT_AN_IMAGE}: no such file{where}")
    return path


def _read_capped(path: Path) -> bytes:
    """A file's bytes; BadRequest when it holds more than MAX_FILE_MB (never read whole)."""
    cap = MAX_FILE_MB * 2**20
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise BadRequest(f"image file too large: over {MAX_FILE_MB} MB; at most {MAX_FILE_MB} MB")
    return data


def decode_image(value: str, image_size: int, image_root: str | None = None,
                 any_path: bool = False) -> torch.Tensor:
    """A base64 film (or a file path: under `image_root` when set, any path when `any_path`)
    -> the model's input (1, S, S).

    Base64 is tried first and a path is never touched unless paths are allowed: a 224x224 PNG
    is ~67 KB of base64, far too long for a file name, and a server must not tell clients
    which of its files exist.
    """
    from pipeline.data.images import model_input

    if not isinstance(value, (str, bytes)):
        raise BadRequest(f"{_NOT_AN_IMAGE}, got {type(value).__name__}")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        data = None
    array = _decode(data, image_size, "request image") if data else None
    if array is None:
        paths_allowed = bool(image_root) or any_path
        if data and not paths_allowed:
            raise BadRequest(f"{_NOT_AN_IMAGE}: the base64 decodes to {len(data)} bytes that "
                             "are not a PNG/JPEG/DICOM")
        path = _allowed_path(text, image_root, any_path)
        array = _decode(_read_capped(path), image_size, str(path))
        if array is None:
            raise BadRequest(f"{_NOT_AN_IMAGE}: {text!r} is not a PNG/JPEG/DICOM")
    return model_input([array])


DEVICE_ENV = "REPORT_VLM_DEVICE"  # auto (default): the GPU when one is visible, else the CPU


def serving_device() -> torch.device:
    """The device a served model runs on (`REPORT_VLM_DEVICE`, default auto)."""
    return resolve_device(os.environ.get(DEVICE_ENV) or "auto")


def _image_chunks(frame, image_size: int, served: bool):
    """The frame's images as (n, 1, S, S) tensors, CHUNK_ROWS rows at a time."""
    root = os.environ.get(IMAGE_ROOT_ENV) or None
    values = list(frame["image"])
    for start in range(0, len(values), CHUNK_ROWS):
        chunk = values[start:start + CHUNK_ROWS]
        yield torch.stack([decode_image(v, image_size, root, any_path=not served)
                           for v in chunk])


class VisionBridgePyfunc(mlflow.pyfunc.PythonModel):
    """Images -> pooled visual features (one vector per image)."""

    def load_context(self, context):
        from pipeline import config as C
        from pipeline.models.loading import load_vision_bridge

        self.device = serving_device()
        self.model, self.metadata, self.cfg = load_vision_bridge(
            context.artifacts["checkpoint"], C.Stage1Config(), self.device)

    def predict(self, context, model_input, params=None):
        served = in_scoring_server()
        frame = _to_frame(model_input, served)
        vectors = []
        with torch.no_grad():
            for images in _image_chunks(frame, self.cfg.encoder.image_size, served):
                tokens = self.model(to_device(images, self.device))
                vectors += to_storage(tokens.mean(dim=1)).numpy().tolist()
        return vectors


class ReportVLMPyfunc(mlflow.pyfunc.PythonModel):
    """Images -> generated reports. Params: `num_beams`, `max_new_tokens`."""

    def load_context(self, context):
        from pipeline.models.loading import load_report_model

        self.report_model = load_report_model(context.artifacts["checkpoint"],
                                              device=serving_device())

    def predict(self, context, model_input, params=None):
        chosen = generation_params(params)
        served = in_scoring_server()
        frame = _to_frame(model_input, served)
        reports = []
        for images in _image_chunks(frame, self.report_model.cfg.encoder.image_size, served):
            reports += self.report_model.generate(images, num_beams=chosen["num_beams"],
                                                  max_new_tokens=chosen["max_new_tokens"] or None)
        return reports
