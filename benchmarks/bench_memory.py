"""Peak memory of `evaluate` against the size of the split: 500 and 4,000 synthetic studies.

Each size runs in its own subprocess (a fresh interpreter, so one run's heap does not carry
into the other) that generates the synthetic split, evaluates a tiny random Stage 2 model on
it (greedy, one new token: generation cost is not what is measured) and reports its own peak
RSS (`ru_maxrss`). Memory that does not grow with the split keeps the ratio near 1; the
target is 4,000 within 1.2x of 500.

    python benchmarks/bench_memory.py [--sizes 500 4000] [--image-size 224]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(n_test: int, image_size: int, folder: str) -> dict:
    """Evaluate a tiny random model on `n_test` synthetic studies; peak RSS in MB."""
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline import config as C
    from pipeline.evaluate.evaluation import evaluate_model
    from pipeline.models.report_model import ReportModel
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.models.vision_bridge import VisionBridge

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = C.build(C.Stage2Config, "tiny")
    data = replace(cfg.data, root=folder, n_train=8, n_val=2, n_test=n_test,
                   image_size=image_size)
    cfg = replace(cfg, data=data, encoder=replace(cfg.encoder, image_size=image_size),
                  max_new_tokens=1)
    llm = build_tiny_llm()
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size).eval()
    start = time.monotonic()
    outcome = evaluate_model(None, report_model=ReportModel(model, llm, cfg), meteor=False,
                             out_dir=str(Path(folder) / "out"))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return {"studies": int(outcome.metrics["greedy_n_reports"]), "peak_rss_mb": peak_kb / 1024,
            "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.image_size, args.folder)))
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(size), "--image-size",
                 str(args.image_size), "--folder", folder],
                capture_output=True, text=True, check=True,
                env={**os.environ, "TQDM_DISABLE": "1"})
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'studies':>8} {'peak RSS MB':>12} {'eval s':>8}")
    for row in rows:
        print(f"{row['studies']:>8} {row['peak_rss_mb']:>12.0f} {row['seconds']:>8.1f}")
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        verdict = "within" if ratio <= 1.2 else "OVER"
        print(f"ratio {rows[-1]['studies']}/{rows[0]['studies']}: {ratio:.2f}x "
              f"({verdict} the 1.2x target)")


if __name__ == "__main__":
    main()
