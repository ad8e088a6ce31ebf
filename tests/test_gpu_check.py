"""benchmarks/gpu_check.sh's table, exercised on the CPU (`--dry-run`: toy sizes, no kernels,
no subprocess runs); the GPU rows themselves need a GPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _status_column(lines: list[str]) -> set[int]:
    return {line.rstrip().rindex("  ") for line in lines}


def test_dry_run_prints_one_table_with_every_section():
    """`benchmarks/gpu_check.sh --dry-run`, the command a GPU machine runs, on this CPU."""
    import os
    import subprocess

    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    table = [line for line in done.stdout.splitlines() if line.strip()]
    table = table[next(i for i, line in enumerate(table) if line.split()[:1] == ["check"]):]
    assert table[0].split() == ["check", "result", "status"] and set(table[1]) == {"-"}
    text = "\n".join(table)
    for section in ("cpu (no CUDA: dry run)", "mixer L=16 fwd+bwd (fp32)", "kernel n/a (no CUDA)",
                    "stage2 step (tiny, tiny-random", "steps/s", "stage2 step / frozen LLM",
                    "host syncs per stage2 step (fake CUDA, tiny)",
                    "demo profile main run", "DDP 2 processes vs 1"):
        assert section in text, section
    assert len(_status_column([table[0], *table[2:]])) == 1  # one aligned table


def test_a_failing_row_fails_the_check(monkeypatch, capsys):
    check = _module()
    rows = [check.Row("device", "x"), check.Row("mixer parity", "fp32 3e-2 (tol 0.002)", "FAIL")]
    monkeypatch.setattr(check, "run_check", lambda *a, **k: rows)
    assert check.main(["--dry-run"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("FAIL")
