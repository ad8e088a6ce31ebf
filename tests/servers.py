"""`mlflow server` for tests: free ports, start and wait for /health, stop the whole group.

Servers bind 127.0.0.1 only and run in their own session: `mlflow server` spawns uvicorn and
a job runner, and stopping it must take all of them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status of GET url (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status


def healthy(base: str) -> bool:
    """True when the server at `base` answers /health."""
    try:
        return get_status(f"{base}/health") == 200
    except OSError:
        return False


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, log_path: Path,
                        timeout: float = 120.0) -> subprocess.Popen:
    """Start `mlflow server` (1 worker) on 127.0.0.1:port and wait until /health answers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base, started = f"http://127.0.0.1:{port}", time.monotonic()
    while not healthy(base):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n"
                               + Path(log_path).read_text()[-2000:])
        if time.monotonic() - started > timeout:
            stop_process_group(proc)
            raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")
        time.sleep(0.5)
    return proc


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group (the parent stops its children), then SIGKILL stragglers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
