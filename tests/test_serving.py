"""The registered `report-vlm` pyfunc: loaded in-process and served by `mlflow models serve`."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from steps import evaluate, stage2
from tests.grounded_data import write_dataset

MODEL = "report-vlm"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, grounded_llm):
    """A store holding one tiny Stage 2 version, evaluated: alias `candidate` and `champion`.

    Module-scoped (unlike `mlflow_store`) so training and evaluation happen once per module.
    Trained on a tiny dataset whose reports the image decides, with an LLM that follows a
    findings prompt (tests/grounded_data.py), so the champion gate can promote it.
    """
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        mp.setenv("REPORT_VLM_IMAGE_ROOT", str(root))  # paths are accepted under the root only
        mlflow.set_tracking_uri(uri)
        try:
            data = str(write_dataset(root / "data", informative=True, n_eval=4))
            trained = CliRunner().invoke(stage2.main, [
                "--profile", "tiny", "--init", "scratch", "--data", data, "--llm",
                str(grounded_llm), "--epochs", "2", "--lr", "1e-2", "--encoder_lr", "same"],
                catch_exceptions=False)
            assert trained.exit_code == 0, trained.output
            scored = CliRunner().invoke(evaluate.main, ["--profile", "tiny", "--num_beams", "1",
                                                        "--no-meteor", "--data", data],
                                        catch_exceptions=False)
            assert scored.exit_code == 0, scored.output
            yield {"uri": uri, "root": root,
                   "image": sorted((root / "data").rglob("*.png"))[0]}
        finally:
            if mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
            mlflow.tracking.fluent._active_experiment_id = None


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _png_b64(size: int = 48) -> str:
    """A PNG the model has never seen (a different size from the training images)."""
    buffer = io.BytesIO()
    Image.new("L", (size, size), color=128).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def candidate(registry):
    return mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")


def test_pyfunc_writes_one_report_per_path_or_base64_image(registry, candidate):
    image = registry["image"]
    from_path = candidate.predict(pd.DataFrame({"image": [str(image)]}))
    assert len(from_path) == 1 and isinstance(from_path[0], str)
    mixed = candidate.predict([{"image": _b64(image)}, {"image": str(image)},
                               {"image": _png_b64()}])
    assert len(mixed) == 3 and all(isinstance(text, str) for text in mixed)
    # The same picture as a path or as base64 is the same input; decoding is greedy.
    assert mixed[0] == mixed[1] == from_path[0]


@pytest.mark.parametrize("garbage", ["not an image at all", "aGVsbG8gd29ybGQ=",  # b"hello world"
                                     "missing/0.png"])
def test_pyfunc_garbage_image_gives_a_clear_error(candidate, garbage):
    with pytest.raises(ValueError, match="existing file path or a base64 PNG/JPEG"):
        candidate.predict([{"image": garbage}])


def _noise_png_b64(size: int) -> str:
    """A real-looking PNG: noise does not compress, so 224 px is ~67 KB of base64."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_pyfunc_reads_a_224px_png_sent_as_base64(candidate, monkeypatch):
    monkeypatch.delenv("REPORT_VLM_IMAGE_ROOT", raising=False)
    body = _noise_png_b64(224)
    assert len(body) > 60_000  # longer than any file name: Path(body).exists() would raise
    (report,) = candidate.predict(pd.DataFrame({"image": [body]}))
    assert isinstance(report, str)


def test_pyfunc_reads_paths_in_process_and_keeps_them_under_the_root_when_one_is_set(
        registry, candidate, monkeypatch, tmp_path):
    image = registry["image"]
    monkeypatch.delenv("REPORT_VLM_IMAGE_ROOT", raising=False)
    assert len(candidate.predict([{"image": str(image)}])) == 1  # in-process: any file
    monkeypatch.setenv("REPORT_VLM_IMAGE_ROOT", str(tmp_path))  # the image lies outside it
    with pytest.raises(ValueError, match="only under REPORT_VLM_IMAGE_ROOT"):
        candidate.predict([{"image": str(image)}])
    monkeypatch.setenv("REPORT_VLM_IMAGE_ROOT", str(image.parent))
    assert len(candidate.predict([{"image": image.name}])) == 1  # relative to the root


def test_pyfunc_in_process_takes_more_rows_than_a_served_request(candidate):
    from pipeline.evaluate.serving import MAX_IMAGES

    reports = candidate.predict([{"image": _png_b64()}] * (MAX_IMAGES + 3))
    assert len(reports) == MAX_IMAGES + 3


@pytest.mark.parametrize("request_body", [[{"picture": "x"}], [{"image": 7}], 42])
def test_pyfunc_malformed_request_gives_a_clear_error(candidate, request_body):
    # MLflow's schema check answers some of these before the model sees them.
    with pytest.raises((ValueError, mlflow.exceptions.MlflowException), match="image"):
        candidate.predict(request_body)


def test_pyfunc_params_reach_generation(registry, candidate):
    """`num_beams` / `max_new_tokens` (the class's documented params) must not be dropped."""
    inner = candidate.unwrap_python_model()
    calls = []
    generate = inner.report_model.generate

    def spy(images, **kwargs):
        calls.append(kwargs)
        return generate(images, **kwargs)

    inner.report_model.generate = spy
    try:
        candidate.predict([{"image": str(registry["image"])}],
                          params={"num_beams": 2, "max_new_tokens": 3})
    finally:
        inner.report_model.generate = generate
    assert calls == [{"num_beams": 2, "max_new_tokens": 3}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_model(registry, model_uri: str = f"models:/{MODEL}@champion", **env_changes):
    """`mlflow models serve` of `model_uri` on 127.0.0.1; yields (base URL, process).

    `env_changes` set (a value) or remove (None) variables of the server's environment.
    """
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"],
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log = open(registry["root"] / f"serve_{port}.log", "w+")
    # Its own session: `serve` runs uvicorn in a child process, and the group is ended as one.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve",
                             "-m", model_uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=registry["root"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server not up after 90 s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(registry):
    """`mlflow models serve` of the champion on 127.0.0.1; yields its base URL."""
    with serve_model(registry) as (url, _):
        yield url


def _post(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def test_served_champion_answers_an_inputs_request(server, registry):
    response = _post(server, {"inputs": [{"image": _b64(registry["image"])}]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 1 and isinstance(predictions[0], str)


def test_served_champion_answers_a_dataframe_records_request(server):
    response = _post(server, {"dataframe_records": [{"image": _png_b64()}]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 1 and isinstance(predictions[0], str)


def test_served_champion_reads_a_224px_png(server):
    response = _post(server, {"inputs": [{"image": _noise_png_b64(224)}]})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["predictions"][0], str)


def test_served_champion_refuses_a_garbage_image_with_400(server):
    response = _post(server, {"inputs": [{"image": "not an image at all"}]})
    assert response.status_code == 400
    assert "base64 PNG/JPEG" in response.text


def test_served_champion_refuses_an_oversized_request_with_400(server):
    from pipeline.evaluate.serving import MAX_IMAGES

    response = _post(server, {"inputs": [{"image": _png_b64()}] * (MAX_IMAGES + 1)})
    assert response.status_code == 400, response.text
    assert f"at most {MAX_IMAGES}" in response.text
