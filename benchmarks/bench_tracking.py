"""Stage 1 step time with MLflow tracking on versus off, measured side by side in one run.

Steps alternate between the two modes (on, off, on, off, ...) on the same model and data so
machine noise hits both equally. "on" logs every step's metrics through the project's
MetricsSink into a real sqlite store (buffered `log_batch`); "off" drops them.

    .venv/bin/python benchmarks/bench_tracking.py [--profile demo] [--steps 200]
"""
from __future__ import annotations

import statistics
import tempfile
import time

import click
import torch


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--steps", default=200, show_default=True, help="steps per mode")
def main(profile: str, steps: int) -> None:
    import mlflow

    from pipeline import config as C
    from pipeline.stage1 import Stage1Trainer, build_stage1_inputs
    from pipeline.tracking import MetricsSink
    from pipeline.train_utils import build_optimizer

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
    cfg = C.build(C.Stage1Config, profile, {"data.root": f"{tmp}/data"})
    inputs = build_stage1_inputs(cfg)
    run = mlflow.start_run()
    sink = MetricsSink(run.info.run_id)
    trainer = Stage1Trainer(cfg, inputs.model, inputs.train_loader, inputs.val_loader,
                            inputs.probe_images, tmp, run.info.run_id, sink, lambda t: None,
                            __import__("logging").getLogger("bench"))
    optimizer, scheduler = build_optimizer(inputs.model, cfg.lr, 0.0, 10 * steps, 0)
    batches = [b["images"] for b in inputs.train_loader]
    times = {"on": [], "off": []}
    for i in range(2 * steps + 10):
        mode = "on" if i % 2 == 0 else "off"
        trainer.log_metrics = sink if mode == "on" else (lambda m, s: None)
        start = time.perf_counter()
        trainer._train_step(batches[i % len(batches)], optimizer, scheduler)
        if mode == "on" and len(sink._buffer) >= sink.flush_every:
            sink.flush()
        elapsed = time.perf_counter() - start
        if i >= 10:  # warm-up
            times[mode].append(elapsed)
    start = time.perf_counter()
    sink.flush()
    final_flush = time.perf_counter() - start
    mlflow.end_run()
    on_total = sum(times["on"]) + final_flush
    off_total = sum(times["off"])
    print(f"profile={profile} steps/mode={steps} threads={torch.get_num_threads()}")
    for mode in ("on", "off"):
        print(f"  tracking {mode:3s}: mean {1000 * statistics.mean(times[mode]):7.2f} ms/step, "
              f"median {1000 * statistics.median(times[mode]):7.2f} ms/step")
    print(f"  final flush: {1000 * final_flush:.1f} ms")
    diff = 100 * (on_total - off_total) / off_total
    print(f"  total on/off = {on_total:.2f}s / {off_total:.2f}s -> overhead {diff:+.2f}% "
          f"({'PASS' if diff < 2.0 else 'FAIL'}: target < 2%)")


if __name__ == "__main__":
    main()
