"""MLflow pyfunc wrappers: registry versions hold our checkpoint, not a pickled model.

Input for both: a DataFrame (or list of dicts) with a column `image` holding a file path or a
base64-encoded PNG/JPEG. `report-vlm` versions reference the LLM by name (`llm` in the
checkpoint's config) rather than carrying a copy of its weights.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch


def _to_frame(model_input):
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        frame = pd.DataFrame(model_input)
    else:
        frame = pd.DataFrame(list(model_input))
    if "image" not in frame.columns or frame.empty:
        raise ValueError("input needs at least one record with an `image` (path or base64 PNG/JPEG)")
    return frame


def decode_image(value: str, image_size: int) -> torch.Tensor:
    """A path or base64 PNG/JPEG -> normalised grayscale tensor (1, S, S)."""
    from PIL import Image

    text = str(value)
    if Path(text).exists():
        image = Image.open(text)
    else:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError
            raise ValueError("`image` must be an existing file path or a base64 PNG/JPEG") from exc
    image = image.convert("L").resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).unsqueeze(0)


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
        images = torch.stack([decode_image(v, size) for v in frame["image"]])
        with torch.no_grad():
            tokens = self.model(images)
        return tokens.mean(dim=1).numpy().tolist()


class ReportVLMPyfunc(mlflow.pyfunc.PythonModel):
    """Images -> generated reports. Params: `num_beams`, `max_new_tokens`."""

    def load_context(self, context):
        from pipeline.models.loading import load_report_model

        self.report_model = load_report_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        params = params or {}
        frame = _to_frame(model_input)
        size = self.report_model.cfg.encoder.image_size
        images = torch.stack([decode_image(v, size) for v in frame["image"]])
        return self.report_model.generate(
            images, num_beams=int(params.get("num_beams", 1)),
            max_new_tokens=int(params.get("max_new_tokens", 0)) or None)
