"""Stage 1 step time with MLflow tracking on versus off, measured side by side in one run.

Steps alternate between the two modes (on, off, on, off, ...) on the same model and data so
machine noise hits both equally. "on" logs every step's metrics through the project's
MetricsSink into a real sqlite store (buffered `log_batch`); "off" drops them. Printed: the
median and the 10%-trimmed mean per mode (a shared 2-core machine has load spikes that a
plain mean would charge to whichever mode they hit), and the time spent inside the tracking
calls themselves as a share of the "on" steps' time: the direct measure of the overhead.

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
    from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs
    from pipeline.tracking.sink import MetricsSink

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
    cfg = C.build(C.Stage1Config, profile, {"data.root": f"{tmp}/data"})
    inputs = build_stage1_inputs(cfg)
    run = mlflow.start_run()
    sink = MetricsSink(run.info.run_id)
    trainer = Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images, tmp,
                            run.info.run_id, sink, lambda t: None,
                            __import__("logging").getLogger("bench"))
    batches = list(inputs.loaders.epoch(1))
    trainer._t0 = time.monotonic()  # the CSV's seconds column counts from here
    times = {"on": [], "off": []}
    in_tracking = [0.0]

    def timed_sink(metrics, step):
        start = time.perf_counter()
        sink(metrics, step)  # buffers; sends a log_batch every flush_every points
        in_tracking[0] += time.perf_counter() - start

    for i in range(2 * steps + 10):
        mode = "on" if i % 2 == 0 else "off"
        trainer.log_metrics = timed_sink if mode == "on" else (lambda m, s: None)
        if i == 10:
            in_tracking[0] = 0.0
        start = time.perf_counter()
        trainer._step(batches[i % len(batches)], 1)
        elapsed = time.perf_counter() - start
        if i >= 10:  # warm-up
            times[mode].append(elapsed)
    start = time.perf_counter()
    sink.flush()
    in_tracking[0] += time.perf_counter() - start
    mlflow.end_run()
    print(f"profile={profile} steps/mode={steps} threads={torch.get_num_threads()}")
    stats = {}
    for mode in ("on", "off"):
        ordered = sorted(times[mode])
        trimmed = ordered[: int(len(ordered) * 0.9)]
        stats[mode] = (statistics.median(ordered), statistics.mean(trimmed))
        print(f"  tracking {mode:3s}: median {1000 * stats[mode][0]:7.2f} ms/step, "
              f"trimmed mean {1000 * stats[mode][1]:7.2f} ms/step")
    for i, name in enumerate(("median", "trimmed mean")):
        diff = 100 * (stats["on"][i] - stats["off"][i]) / stats["off"][i]
        print(f"  on vs off ({name}): {diff:+.2f}% ({'PASS' if diff < 2.0 else 'FAIL'}: < 2%)")
    share = 100 * in_tracking[0] / sum(times["on"])
    print(f"  time inside tracking calls: {1000 * in_tracking[0]:.1f} ms over {steps} steps "
          f"= {share:.2f}% of the tracked steps' time ({'PASS' if share < 2.0 else 'FAIL'}: < 2%)")


if __name__ == "__main__":
    main()
