"""Waiting on a training subprocess from a test (to kill it at a known point)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest


def wait_for_csv_rows(root: Path, pattern: str, rows: int, proc: subprocess.Popen,
                      timeout: float = 180) -> Path:
    """The first CSV under `root` matching `pattern` once it holds `rows` rows; fails the
    test when `proc` ends first or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(Path(root).glob(pattern))
        if found and len(pd.read_csv(found[0])) >= rows:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it reached {rows} steps:\n" + proc.stdout.read())
        time.sleep(0.02)
    pytest.fail(f"no {pattern} with {rows} rows under {root} after {timeout} s")
