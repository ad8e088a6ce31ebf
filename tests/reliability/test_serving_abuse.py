"""The served `report-vlm` champion under malformed requests: a 4xx with the reason, and it
keeps answering.

`mlflow models serve` runs the champion trained by tests/test_serving.py's `registry` fixture,
with file paths refused (no REPORT_VLM_IMAGE_ROOT). Every malformed request must get a 4xx
whose `message` says what was wrong, the server must answer /ping right after it, and at the
end a valid 224x224 PNG still gets a report from the same process.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.evaluate.serving import (MAX_IMAGES, MAX_PIXELS, MAX_REQUEST_MB, BadRequest,
                                       decode_image, generation_params)
from tests.reliability.tally import count
from tests.test_serving import registry, serve_model  # noqa: F401  (registry is a fixture)



def _png_b64(size: int, mode: str = "L") -> str:
    pixels = np.random.default_rng(size).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bomb_b64() -> str:
    """A 48 KB PNG that claims 20000 x 20000 pixels (400 MB once decoded)."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _text_b64() -> str:
    return base64.b64encode(b"The heart is normal in size. The lungs are clear.\n").decode()


# (case, request body: a JSON-able object or raw bytes, a phrase the message must hold)
ABUSE = [
    ("bad base64", {"inputs": [{"image": "!!!not*base64###"}]}, "not valid base64"),
    ("a non-image (text bytes)", {"inputs": [{"image": _text_b64()}]}, "not a PNG/JPEG"),
    ("a 20 MB body", {"inputs": [{"image": "A" * (20 * 2**20)}]},
     f"at most {MAX_REQUEST_MB} MB per request"),
    ("a file path, paths not allowed", {"inputs": [{"image": "/etc/passwd"}]},
     "file paths are not accepted"),
    ("a relative path, paths not allowed", {"inputs": [{"image": "data/images/a/0.png"}]},
     "file paths are not accepted"),
    ("wrong JSON shape: no image column", {"inputs": [{"picture": "x"}]}, "missing inputs"),
    ("wrong JSON shape: a list", [1, 2, 3], "JSON dictionary"),
    ("wrong JSON shape: no input key", {"images": ["x"]}, "exactly one of the input fields"),
    ("wrong JSON shape: a list as the image", {"inputs": [{"image": ["a", "b"]}]},
     "base64 PNG/JPEG"),
    ("wrong JSON shape: a number as the image", {"inputs": [{"image": 7}]}, "base64 PNG/JPEG"),
    ("an empty list", {"inputs": []}, "at least one record"),
    ("empty dataframe records", {"dataframe_records": []}, "image"),
    ("not JSON", b"{not json", "valid JSON"),
    ("invalid UTF-8", b'{"inputs": [{"image": "\xff\xfe"}]}', "valid JSON"),
    ("a decompression bomb", {"inputs": [{"image": _bomb_b64()}]}, "image too large"),
    ("too many images", {"inputs": [{"image": _png_b64(16)}] * (MAX_IMAGES + 1)},
     f"at most {MAX_IMAGES}"),
    ("num_beams 1000", {"inputs": [{"image": _png_b64(16)}], "params": {"num_beams": 1000}},
     "param num_beams must be in"),
    ("max_new_tokens -5",
     {"inputs": [{"image": _png_b64(16)}], "params": {"max_new_tokens": -5}},
     "param max_new_tokens must be in"),
]


@pytest.fixture(scope="module")
def served(registry):  # noqa: F811
    """The champion served with file paths refused; yields (base URL, server process)."""
    with serve_model(registry, REPORT_VLM_IMAGE_ROOT=None) as (url, proc):
        yield url, proc


def _post(url: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, timeout=120,
                         headers={"Content-Type": "application/json"})


@pytest.mark.slow  # the fixture trains and evaluates a tiny champion, then serves it
@pytest.mark.reliability
@pytest.mark.parametrize("case, body, reason", ABUSE, ids=[case for case, _, _ in ABUSE])
def test_malformed_request_gets_a_4xx_with_the_reason_and_the_server_keeps_answering(
        served, case, body, reason):
    url, proc = served
    response = _post(url, body)
    count("served requests", f"{response.status_code}")
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:500])
    message = response.json()["message"]  # the reason itself, not only a stack trace
    assert reason in message, (case, message[-1000:])
    assert "unexpected error" not in message, (case, message[-1000:])
    assert proc.poll() is None, f"the server died on {case}"
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.reliability
def test_after_the_abuse_a_224px_png_still_gets_a_report(served):
    url, proc = served
    response = _post(url, {"inputs": [{"image": _png_b64(224)}]})
    count("served requests", f"{response.status_code}")
    assert response.status_code == 200, response.text[:1000]
    (report,) = response.json()["predictions"]
    assert isinstance(report, str) and report.strip()
    assert proc.poll() is None


# ----------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("params, reason", [
    ({"num_beams": 0}, "must be in [1, 8]"), ({"num_beams": 2.5}, "must be an integer"),
    ({"num_beams": True}, "must be an integer"), ({"max_new_tokens": "many"}, "an integer"),
    ({"max_new_tokens": float("inf")}, "an integer"), ({"max_new_tokens": 10**9}, "[0, 1024]"),
])
def test_generation_params_out_of_range_are_a_bad_request(params, reason):
    with pytest.raises(BadRequest, match=reason.replace("[", r"\[").replace("]", r"\]")):
        generation_params(params)


def test_generation_params_defaults_and_numeric_strings():
    assert generation_params(None) == {"num_beams": 1, "max_new_tokens": 0}
    assert generation_params({"num_beams": "3", "max_new_tokens": 64.0}) == {
        "num_beams": 3, "max_new_tokens": 64}


def test_bad_request_is_a_value_error_and_an_mlflow_400():
    error = BadRequest("why")
    assert isinstance(error, ValueError) and error.get_http_status_code() == 400
    assert error.message == "why"


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    side = int(MAX_PIXELS ** 0.5) + 1
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    with pytest.raises(BadRequest, match=f"{side} x {side} pixels"):
        decode_image(base64.b64encode(buffer.getvalue()).decode(), 16)
    with pytest.raises(BadRequest, match="image too large"):
        decode_image(_bomb_b64(), 16)
