"""Two ranks stop after the same step when a stop signal reaches only one of them mid-step.

Under torchrun a Ctrl-C reaches the ranks at slightly different moments. A rank that stopped
after step N while its peer had entered step N+1 left the peer's all-reduce facing a closed
connection: the run ended FAILED instead of KILLED. The ranks agree on the stop at each step's
end, so every rank stops after the same step. Two gloo processes on the CPU run the real
`TrainLoop.fit` with a step that all-reduces, as DDP's backward does.
"""
from __future__ import annotations

import os
import signal
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two fresh interpreters

STOP_AT = 3  # rank 1 receives the signal inside this step; rank 0 never does


def _rank(rank: int, port: int, folder: str, stop_rank: int) -> None:
    from pipeline import interrupts
    from pipeline.train.distributed import World
    from pipeline.train.loop import TrainLoop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    world = World(rank=rank, size=2)
    model = torch.nn.Linear(2, 1)

    class Loop(TrainLoop):
        name, step_stem, final_stem = "stoptest", "stoptest_step", "stoptest"

        def _train_step(self, batch):
            grad = torch.ones(1)
            if rank == stop_rank and self.step + 1 == STOP_AT:
                os.kill(os.getpid(), signal.SIGINT)  # mid-step: held back until it ends
            dist.all_reduce(grad)  # what DDP's backward does every step
            self.optimizer.step()
            return float(grad), {"loss": float(grad)}

        def step_metrics(self, row):
            return {}

        def _end_epoch(self, epoch, train_loss):
            return None

    cfg = types.SimpleNamespace(epochs=1, checkpoint_every=10**9, lr=0.0)
    loaders = types.SimpleNamespace(batches_per_epoch=50,
                                    epoch=lambda epoch, skip: iter(range(skip, 50)))
    loop = Loop(cfg, loaders, Path(folder) / f"rank{rank}", "run", lambda m, s: None,
                lambda t: None, __import__("logging").getLogger("stoptest"), lambda: None, world)
    loop.model, loop.optimizer = model, torch.optim.SGD(model.parameters(), lr=0.0)
    loop.scheduler = None
    loop.result = types.SimpleNamespace(final_train_loss=0.0, best_val_loss=float("inf"),
                                        epochs_done=0, checkpoints={})
    loop.save = lambda *a, **k: None
    outcome = "finished"
    with interrupts.stop_signals_raise():
        try:
            loop.fit()
        except KeyboardInterrupt:
            outcome = "stopped"
        except Exception as exc:  # noqa: BLE001 - what the peer's collective met
            outcome = f"failed: {type(exc).__name__}"
    (Path(folder) / f"rank{rank}.txt").write_text(f"{outcome} {loop.step}")
    dist.destroy_process_group()


@pytest.mark.parametrize("stop_rank", [1, 0])
def test_a_stop_on_one_rank_mid_step_stops_both_after_the_same_step(tmp_path, stop_rank):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path), stop_rank), nprocs=2,
                       start_method="spawn", join=True)
    ends = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert ends == [f"stopped {STOP_AT}"] * 2, \
        f"rank 0 / rank 1 ended {ends}: the ranks did not stop after the same step"
