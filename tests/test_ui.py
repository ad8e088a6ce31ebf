"""The MLflow UI's run-comparison page shows both Stage 1 runs and their `final_train_loss`.

Starts `mlflow server` on the fixture store (127.0.0.1 only), renders the compare page with
headless Chromium (a screenshot, kept as tests/artifacts/ui_compare.png, and the DOM after
the React app has rendered) and reads the metrics grid. Skipped when Chromium is missing
(`make browser` installs it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from html import unescape
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures_runs import populate

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
STAGE1_RUNS = ("stage1-l2proxy-lr1e-4", "stage1-vicreg-lr1e-5")
# Taller than a laptop screen so that the Metrics section is inside the screenshot too.
WINDOW = "1600,2000"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with opener.open(url, timeout=timeout) as response:
        return response.status


def _ui_metric(value: float) -> str:
    """How the UI prints a metric: MLflow's JS `Utils.formatMetric`, transcribed."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:  # JS toExponential(3): "1.492e-4"
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    rounded = math.floor(value * 10**digits + 0.5) / 10**digits
    return str(int(rounded)) if rounded == int(rounded) else repr(rounded)


def _metric_rows(dom: str) -> dict[str, list[str]]:
    """Metric name -> displayed values, from the compare page's two virtualized grids.

    Names and values are separate absolutely positioned cells; a row is a shared `top`.
    """
    cell = re.compile(r'<div class="[^"]*" style="height: \d+px; left: (\d+)px; '
                      r'position: absolute; top: (\d+)px; width: \d+px;">(.*?)</div>', re.S)
    names, values = {}, {}
    for left, top, inner in cell.findall(dom):
        text = unescape(re.sub(r"<[^>]+>", "", inner)).strip()
        if 'title="Plot chart"' in inner:
            names[top] = text
        elif "tooltip-data-state" in inner:
            values.setdefault(top, []).append((int(left), text))
    return {name: [t for _, t in sorted(values.get(top, []))] for top, name in names.items()}


@pytest.fixture()
def chromium():
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (`make browser` installs Debian's package)")
    return path


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """`mlflow server` on a populated fixture store; yields (base URL, run ids)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # here and in the server: nothing
    monkeypatch.setenv("DO_NOT_TRACK", "true")  # may leave 127.0.0.1
    db = tmp_path / "mlflow.db"
    ids = populate(f"sqlite:///{db}", tmp_path / "artifacts")
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(tmp_path / "served-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Own session: the server spawns uvicorn and a job runner, and all of them must go.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started, base = time.monotonic(), f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            + (tmp_path / "server.log").read_text()[-2000:])
            try:
                if _get(f"{base}/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - started > 90:
                pytest.fail("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)
        print(f"mlflow server up in {time.monotonic() - started:.1f} s")
        yield base, ids
    finally:
        # SIGTERM lets the parent stop its children; SIGKILL then takes any straggler.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        log.close()


def _chromium(binary: str, profile: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server",
           f"--user-data-dir={profile}", f"--window-size={WINDOW}", "--virtual-time-budget=20000",
           *mode, url]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    print(f"chromium {mode[0].split('=')[0]}: {time.monotonic() - started:.1f} s")
    return result


def test_compare_page_shows_stage1_runs_and_final_loss(chromium, server, tmp_path):
    base, ids = server
    run_ids = [ids[name] for name in STAGE1_RUNS]
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids),
                                    "experiments": json.dumps([ids["experiment_id"]])})
    url = f"{base}/#/compare-runs?{query}"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    expected = [_ui_metric(client.get_run(r).data.metrics["final_train_loss"]) for r in run_ids]

    shot = tmp_path / "ui_compare.png"
    _chromium(chromium, tmp_path / "profile", url, f"--screenshot={shot}")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no screenshot written"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "ui_compare.png")

    dom = _chromium(chromium, tmp_path / "profile", url, "--dump-dom").stdout
    assert "Comparing 2 Runs" in dom, f"compare page did not render:\n{dom[:2000]}"
    for name in STAGE1_RUNS:
        assert name in dom
    rows = _metric_rows(dom)
    assert rows.get("final_train_loss") == expected, (rows, expected)
