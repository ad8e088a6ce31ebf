"""Ctrl-C of `steps.stage1 --nproc 2` (two gloo ranks), N times, with a CPU burner on one core.

Each round starts the tiny Stage 1 under torchrun in a fresh folder and temporary MLflow store,
waits until it has logged a few steps, sends SIGINT to the program (as a terminal's Ctrl-C
reaches it) and reads how the run ended. The burner makes the ranks reach their step ends at
different moments, the case where a rank used to stop one step before its peer. Prints one line
per round and the tally; exit status 1 unless every run ended KILLED with exit code 130.

    python benchmarks/ddp_stop_soak.py --rounds 20
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        sum(i * i for i in range(10_000))


def _steps_logged(folder: Path) -> int:
    logs = list(folder.glob("out/*/stage1_train_log.csv"))
    return max(0, len(logs[0].read_text().splitlines()) - 1) if logs else 0


def one_round(folder: Path, after_steps: int) -> tuple[int, str]:
    """(the program's exit code, the run's status) of one Ctrl-C."""
    import mlflow

    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "steps.stage1", "--profile", "tiny",
                             "--epochs", "50", "--batch_size", "1", "--nproc", "2",
                             "--output_dir", "out"], cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _steps_logged(folder) < after_steps and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    runs = mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()])
    return code, runs[0].info.status if runs else "no run"


@click.command()
@click.option("--rounds", default=20, show_default=True)
@click.option("--after_steps", default=6, show_default=True, help="steps logged before Ctrl-C")
@click.option("--burner/--no-burner", default=True, show_default=True)
def main(rounds: int, after_steps: int, burner: bool) -> None:
    ends = []
    for i in range(1, rounds + 1):
        stop_at = time.monotonic() + 600
        hog = multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True) \
            if burner else None
        if hog:
            hog.start()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                code, status = one_round(Path(tmp), after_steps)
        finally:
            if hog:
                hog.terminate()
                hog.join()
        ends.append((code, status))
        click.echo(f"round {i:2d}: exit {code}, run {status}")
    killed = sum(1 for code, status in ends if code == 130 and status == "KILLED")
    click.echo(f"{killed} of {rounds} KILLED (exit 130)")
    sys.exit(0 if killed == rounds else 1)


if __name__ == "__main__":
    main()
