"""Host syncs per training step, counted on a fake CUDA device (`tests/fake_cuda.py`).

A read of a device value (`aten._local_scalar_dense`: `.item()`, `float(t)`, `bool(t)`,
`.tolist()`) or a device-to-host copy blocks the host until the GPU has caught up. This runs
a few Stage 1 steps (`findings` and `vicreg` objectives) and Stage 2 steps (tiny profile:
adapters, `findings_weight` 3, bf16 autocast) with the device decision forced to cuda:0
under FakeTensorMode, and prints the syncs of each step and where the code asked for them.
No GPU and no data are needed beyond the tiny synthetic set; it runs in seconds on a CPU:

    python benchmarks/bench_syncs.py [--steps 3] [--findings-weight 3.0] [--where]
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: the project is importable from its root
    sys.path.insert(0, str(ROOT))


def count_steps(build, steps: int) -> tuple[list[int], collections.Counter, str | None]:
    """(syncs of each step, where they were asked for, the error that stopped the steps)."""
    from tests.fake_cuda import fake_cuda

    counts, where = [], collections.Counter()
    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as work, \
            pytest.MonkeyPatch.context() as monkeypatch, fake_cuda(monkeypatch) as syncs:
        try:
            trainer = build(Path(work))
            batches = list(trainer.loaders.epoch(1))
            for i in range(steps):
                mark = syncs.mark()
                trainer._step(batches[i % len(batches)], 1)
                step = syncs.since(mark)
                counts.append(len(step))
                where.update(f"{s.kind:4} {s.where[-1] if s.where else '?'}" for s in step)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            return counts, where, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return counts, where, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--findings-weight", type=float, default=3.0)
    parser.add_argument("--where", action="store_true", help="list where each sync comes from")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from tests.fake_cuda import stage1_trainer, stage2_trainer

    runs = [("stage1 findings", lambda w: stage1_trainer(w, "findings")),
            ("stage1 vicreg", lambda w: stage1_trainer(w, "vicreg")),
            (f"stage2 (adapters, findings_weight {args.findings_weight:g}, bf16)",
             lambda w: stage2_trainer(w, findings_weight=args.findings_weight))]
    print(f"{'step':<48} syncs per step (steps 1..{args.steps})")
    for name, build in runs:
        counts, where, error = count_steps(build, args.steps)
        shown = " ".join(str(c) for c in counts) or "-"
        print(f"{name:<48} {shown}" + (f"   stopped: {error}" if error else ""), flush=True)
        if args.where:
            for place, n in where.most_common():
                print(f"    {n:4d}  {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
