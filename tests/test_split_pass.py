"""Memory that does not grow with the split: batched passes and chunked in-process predict."""
from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import config as C
from pipeline.data import image_batch, load_dataset
from pipeline.evaluate import serving
from pipeline.models.report_model import ReportModel, grounding_losses
from pipeline.train.split_pass import split_findings, split_grounding_losses


@pytest.fixture(scope="module")
def tiny_model():
    """A random tiny Stage 2 model (tiny encoder, finding head, tiny LM), built in-process."""
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.models.vision_bridge import VisionBridge

    torch.manual_seed(0)
    cfg = replace(C.build(C.Stage2Config, "tiny"), max_new_tokens=2)
    llm = build_tiny_llm()
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size).eval()
    return ReportModel(model, llm, cfg)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = replace(C.build(C.Stage2Config, "tiny").data, root=str(root), n_test=11)
    return load_dataset(cfg)["test"]


def test_split_pass_gives_the_whole_split_numbers(tiny_model, records):
    size = tiny_model.cfg.encoder.image_size
    images = image_batch(records, size)  # the old way: the whole split as one tensor
    whole = grounding_losses(tiny_model.model, tiny_model.llm, images, [r.report for r in records],
                             tiny_model.cfg)
    batched = split_grounding_losses(tiny_model.model, tiny_model.llm, records, size,
                                     tiny_model.cfg)  # the same batches (16 by default on both sides)
    assert batched == pytest.approx(whole, rel=1e-5)
    if tiny_model.model.has_findings:
        assert split_findings(tiny_model.model, records, size, batch_size=4) == \
            tiny_model.predicted_findings(images)


def _png_b64(value: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyfunc(tiny_model) -> serving.ReportVLMPyfunc:
    wrapper = serving.ReportVLMPyfunc()
    wrapper.report_model = tiny_model  # what load_context would have loaded
    return wrapper


def test_in_process_predict_scores_1000_rows_in_chunks(tiny_model, monkeypatch):
    seen = []

    def encode_only(images, **kwargs):  # the encoder runs; the LM's 1000 decodes would take
        seen.append(images.shape[0])   # a minute (other tests run real generation)
        with torch.no_grad():
            tokens = tiny_model.model(images)
        return [f"report {float(t.mean()):.3f}" for t in tokens]

    monkeypatch.setattr(tiny_model, "generate", encode_only)
    frame = pd.DataFrame({"image": [_png_b64(i % 256) for i in range(1000)]})
    reports = _pyfunc(tiny_model).predict(None, frame)
    assert len(reports) == 1000 and all(isinstance(r, str) for r in reports)
    assert max(seen) <= serving.CHUNK_ROWS and sum(seen) == 1000


def test_in_process_predict_reads_file_paths(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv(serving.IMAGE_ROOT_ENV, raising=False)
    path = tmp_path / "film.png"
    path.write_bytes(base64.b64decode(_png_b64(90)))
    assert len(_pyfunc(tiny_model).predict(None, [{"image": str(path)}])) == 1


def test_the_scoring_server_keeps_its_limits(tiny_model, tmp_path, monkeypatch):
    from mlflow.pyfunc.utils.environment import _simulate_serving_environment

    monkeypatch.delenv(serving.IMAGE_ROOT_ENV, raising=False)
    path = tmp_path / "film.png"
    path.write_bytes(base64.b64decode(_png_b64(90)))
    rows = [{"image": _png_b64(1)}] * (serving.MAX_IMAGES + 1)
    with _simulate_serving_environment():
        assert serving.in_scoring_server()
        with pytest.raises(serving.BadRequest, match=f"at most {serving.MAX_IMAGES}"):
            _pyfunc(tiny_model).predict(None, rows)
        with pytest.raises(serving.BadRequest, match="paths are not accepted"):
            _pyfunc(tiny_model).predict(None, [{"image": str(path)}])
    assert not serving.in_scoring_server()
