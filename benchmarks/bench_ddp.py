"""Stage 1 throughput (samples/s) on 1 and on N data-parallel CPU processes, side by side.

Each row launches `torchrun --standalone --nproc_per_node P` on this file in worker mode; the
workers build the Stage 1 model and data for the profile, train `--steps` steps (after
`--warmup` steps) with the same per-process batch, and rank 0 reports the time between two
barriers. Global batch = per-process batch x P, so samples/s counts what the group trains.
The rows alternate (1, N, 1, N, ...) `--repeats` times so that machine noise hits both; the
table shows each row's median and the scaling ratio against 1 process (ideal: P).

    .venv/bin/python benchmarks/bench_ddp.py [--profile tiny] [--nproc 2] [--steps 30]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import click
import torch


def _worker(profile: str, steps: int, warmup: int, batch_size: int | None) -> None:
    import logging

    from pipeline import config as C
    from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs
    from pipeline.train.distributed import join_world, leave_world

    world = join_world()
    overrides = {"data.root": os.environ["BENCH_DATA"], "batch_size": batch_size}
    cfg = C.build(C.Stage1Config, profile, overrides)
    inputs = build_stage1_inputs(cfg, world)
    out = tempfile.mkdtemp()
    trainer = Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images, out, "bench",
                            lambda m, s: None, lambda t: None, logging.getLogger("bench"),
                            world=world)
    trainer._t0 = time.monotonic()
    batches = list(inputs.loaders.epoch(1))
    for i in range(warmup):
        trainer._step(batches[i % len(batches)], 1)
    world.barrier()
    start = time.perf_counter()
    for i in range(steps):
        trainer._step(batches[(warmup + i) % len(batches)], 1)
    world.barrier()
    seconds = time.perf_counter() - start
    if world.is_main:
        print("BENCH " + json.dumps({"samples": steps * inputs.loaders.global_batch_size,
                                     "seconds": seconds}), flush=True)
    leave_world(world)


def _measure(nproc: int, args: list[str], env: dict) -> float:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), __file__, "--worker", *args],
                          env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{nproc} process(es) failed:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads(line.removeprefix("BENCH "))
    return result["samples"] / result["seconds"]


@click.command()
@click.option("--profile", default="tiny", show_default=True)
@click.option("--nproc", default=2, show_default=True, help="processes of the second row")
@click.option("--steps", default=30, show_default=True, help="timed steps per row")
@click.option("--warmup", default=5, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--batch_size", default=None, type=int, help="per process; default: the profile's")
@click.option("--threads", default=1, show_default=True, help="torch threads per process")
@click.option("--worker", is_flag=True, hidden=True)
def main(profile, nproc, steps, warmup, repeats, batch_size, threads, worker):
    torch.set_num_threads(threads)
    if worker:
        _worker(profile, steps, warmup, batch_size)
        return
    from pipeline import config as C
    from pipeline.data import load_dataset

    data = tempfile.mkdtemp()
    load_dataset(C.build(C.Stage1Config, profile, {"data.root": data}).data)  # generate once
    env = {**os.environ, "BENCH_DATA": data, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    args = ["--profile", profile, "--steps", str(steps), "--warmup", str(warmup),
            "--threads", str(threads)] + (["--batch_size", str(batch_size)] if batch_size else [])
    rates: dict[int, list[float]] = {1: [], nproc: []}
    for _ in range(repeats):
        for count in rates:
            rates[count].append(_measure(count, args, env))
    per_rank = batch_size or C.build(C.Stage1Config, profile).batch_size
    print(f"Stage 1 ({profile}), gloo on CPU, batch {per_rank} per process, {threads} torch "
          f"thread(s) per process, {steps} timed steps, median of {repeats}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'processes':>9} {'global batch':>12} {'samples/s':>10} {'scaling':>8}")
    base = statistics.median(rates[1])
    for count, values in rates.items():
        rate = statistics.median(values)
        print(f"{count:>9} {per_rank * count:>12} {rate:>10.1f} {rate / base:>7.2f}x")


if __name__ == "__main__":
    main()
