"""The MLflow UI tells the pipeline's story, checked in headless Chromium.

- The run-comparison page shows both Stage 1 runs of a fixture store and their
  `final_train_loss` (tests/artifacts/ui_compare.png).
- After a tiny `main` run: the experiment's runs table lists the five runs in pipeline order,
  each named for its stage (tests/artifacts/ui_runs_table.png), and the `report-vlm` model
  page and the evaluated version's page show the champion verdict, the grounding gap and a
  sample report (tests/artifacts/ui_model.png, tests/artifacts/ui_model_version.png).

Each test starts `mlflow server` on its store (127.0.0.1 only) and renders pages with
headless Chromium: a screenshot, and the DOM after the React app has rendered
(--virtual-time-budget). Skipped when Chromium is missing (`make browser` installs it).
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

from pipeline.tracking.runs import EXPERIMENT_NAME
from tests.fixtures_runs import populate
from tests.test_main import _remove_local_outputs, _run_main, _tail

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


@contextlib.contextmanager
def _mlflow_server(db: Path, folder: Path):
    """`mlflow server` over the sqlite store `db` on a free port; yields its base URL."""
    port = _free_port()
    log = (folder / f"server_{port}.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(folder / "served-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Its own session: the server spawns uvicorn and a job runner, and all of them must go.
    # No telemetry from the server either: nothing may leave 127.0.0.1.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    try:
        started, base = time.monotonic(), f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            + Path(log.name).read_text()[-2000:])
            try:
                if _get(f"{base}/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - started > 90:
                pytest.fail("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)
        print(f"mlflow server up in {time.monotonic() - started:.1f} s")
        yield base
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


@pytest.fixture()
def server(tmp_path):
    """`mlflow server` on a populated fixture store; yields (base URL, run ids)."""
    db = tmp_path / "mlflow.db"
    ids = populate(f"sqlite:///{db}", tmp_path / "artifacts")
    with _mlflow_server(db, tmp_path) as base:
        yield base, ids


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


# ----------------------------------------------------------------------------- after `main`
STAGE_PREFIXES = ("main ", "stage1 ", "validate -> ", "stage2 ", "evaluate ")  # pipeline order
# The runs table nests child runs under a collapsed parent when sorted by start time (the
# default) and MLflow 3.17 keeps which parents are expanded out of the URL; any other sort
# lists every run. `attributes.created` is start time under another name: pipeline order.
RUNS_TABLE_QUERY = "orderByKey=attributes.created&orderByAsc=true"


@pytest.fixture(scope="module")
def main_store(tmp_path_factory):
    """A store holding one `python -m steps.main --profile tiny` run; yields its facts."""
    root = tmp_path_factory.mktemp("ui_main")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        EXPERIMENT_NAME, artifact_location=(root / "artifacts").as_uri())
    try:
        started = time.monotonic()
        proc = _run_main(uri, ["--profile", "tiny"])
        print(f"main --profile tiny: {time.monotonic() - started:.0f} s")
        assert proc.returncode == 0, _tail(proc)
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
        (version,) = client.search_model_versions("name='report-vlm'")
        yield {"root": root, "db": root / "mlflow.db", "client": client, "runs": runs,
               "experiment_id": experiment_id, "version": version}
    finally:
        _remove_local_outputs(client)


@pytest.fixture(scope="module")
def main_server(main_store):
    with _mlflow_server(main_store["db"], main_store["root"]) as base:
        yield base


def _page(binary: str, profile: Path, url: str, screenshot: str) -> str:
    """Screenshot `url` to tests/artifacts/<screenshot>; return its DOM once rendered."""
    shot = profile.parent / screenshot
    _chromium(binary, profile, url, f"--screenshot={shot}")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / screenshot)
    return _chromium(binary, profile, url, "--dump-dom").stdout


def _text(dom: str) -> str:
    """The page's visible text, tags dropped, entities decoded, whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _words(text: str) -> str:
    """Letters and digits only: markdown rendering may drop or add punctuation and spacing."""
    return re.sub(r"[\W_]+", "", text)


def _table_rows(dom: str) -> list[tuple[int, str]]:
    """(row index, run id) of the runs table's rows, in row order."""
    rows = {int(i): rid for i, rid in re.findall(r'row-index="(\d+)" row-id="([0-9a-f]{32})"', dom)}
    return sorted(rows.items())


@pytest.mark.slow
def test_runs_table_lists_the_five_runs_by_stage_in_pipeline_order(
        chromium, main_store, main_server, tmp_path):
    runs = main_store["runs"]
    url = f"{main_server}/#/experiments/{main_store['experiment_id']}/runs?{RUNS_TABLE_QUERY}"
    dom = _page(chromium, tmp_path / "profile", url, "ui_runs_table.png")
    text = _text(dom)
    assert "Training runs" in text and "5 matching runs" in text, text[:2000]
    assert [rid for _, rid in _table_rows(dom)] == [r.info.run_id for r in runs], text[:2000]
    names = [r.info.run_name for r in runs]
    for name, prefix in zip(names, STAGE_PREFIXES):
        assert name.startswith(prefix), names
        assert name in text, (name, text[:2000])
    stages = [r.data.tags["pipeline.stage"] for r in runs]
    assert stages == [p.split()[0] for p in STAGE_PREFIXES], stages


@pytest.mark.slow
@pytest.mark.parametrize("page, screenshot", [("", "ui_model.png"),
                                              ("/versions/{version}", "ui_model_version.png")])
def test_model_pages_show_the_champion_verdict_grounding_gap_and_a_sample_report(
        chromium, main_store, main_server, tmp_path, page, screenshot):
    version = main_store["version"]
    tags = version.tags
    url = f"{main_server}/#/models/report-vlm{page.format(version=version.version)}"
    text = _text(_page(chromium, tmp_path / "profile", url, screenshot))
    assert "report-vlm" in text, text[:2000]
    # What decide_champion wrote: the verdict, the grounding gap, a generated report.
    verdict = tags["champion.verdict"]
    assert f"champion gate: {verdict}" in text, text[:3000]
    if verdict == "rejected":
        assert tags["champion.reasons"].split(";")[0] in text, text[:3000]
    assert re.search(rf"grounding gap[^0-9]*{re.escape(tags['eval.grounding_gap'])}", text), \
        text[:3000]
    evaluate = next(r for r in main_store["runs"] if r.data.tags["pipeline.stage"] == "evaluate")
    reports = json.loads(Path(main_store["client"].download_artifacts(
        evaluate.info.run_id, "reports.json", str(tmp_path))).read_text())
    sample = reports["data"][0][reports["columns"].index("generated_greedy")]
    assert _words(sample) and _words(sample) in _words(text), (sample, text[:3000])
