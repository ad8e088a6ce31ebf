"""The demo recipe over several seeds: mean, spread and worst seed, beside the demo's bars.

Each seed trains what `make demo` trains (the demo profile's Stage 1, then its Stage 2 from
that Stage 1, the same data: only the training seed changes) and scores greedy reports on the
test split as `evaluate` does, text as written before any repair. One seed is one number; the
bars hold when they hold on the mean and on the worst seed. No MLflow: the trainers report
into a throwaway sink.

Seed 0 is the demo's own seed. Stage 2 here ends at its last epoch (the demo evaluates its
best-validation checkpoint, which on the demo is the last epoch as well).

    .venv/bin/python benchmarks/bench_seeds.py                       # v1, seeds 0 1 2
    .venv/bin/python benchmarks/bench_seeds.py --data synthetic-v2 --out v2.md
    .venv/bin/python benchmarks/bench_seeds.py --seeds 0 --seeds 5   # any seeds
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning import _stage1, _stage2  # noqa: E402  (one recipe runner for both)

# Column: the evaluate metric it shows (greedy decoding).
METRICS = {
    "coarse_f1": "greedy_finding_coarse_macro_f1",
    "fine_f1": "greedy_finding_macro_f1",
    "head_coarse_f1": "head_finding_coarse_macro_f1",
    "chexpert_micro_f1": "greedy_chexpert_micro_f1",
    "bleu4": "greedy_bleu4",
    "cider": "greedy_cider",
    "gap": "grounding_gap",
    "contradict_written": "greedy_contradiction_share_as_written",
    "prompt_recall": "greedy_prompt_recall",
    "prompt_precision": "greedy_prompt_precision",
    "report_form": "greedy_report_form",
    "retrieval_coarse_f1": "retrieval_finding_coarse_macro_f1",
    "retrieval_chexpert_micro_f1": "retrieval_chexpert_micro_f1",
    "retrieval_bleu4": "retrieval_bleu4",
}
# The demo's bars per benchmark version: (column, at least / at most, value), held on the mean
# and on the worst seed; a column ending `_mean` or `_worst` is held on that one only.
# `over_head` is the report's coarse F1 over the head's of the same seed.
BARS = {
    "synthetic": [("contradict_written", "<=", 0.05), ("prompt_recall", ">=", 0.95),
                  ("prompt_precision", ">=", 0.95), ("over_head", ">=", 0.97),
                  ("bleu4", ">=", 0.220), ("cider", ">=", 0.831), ("coarse_f1", ">=", 0.778),
                  ("over_retrieval_coarse", ">", 0.0), ("over_retrieval_chexpert", ">", 0.0)],
    "synthetic-v2": [("contradict_written", "<=", 0.10), ("coarse_f1_mean", ">=", 0.65),
                     ("coarse_f1_worst", ">=", 0.60)],
}


def _seed_row(profile: str, data: str, seed: int, llm, tmp: Path) -> dict:
    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.evaluate.evaluation import evaluate_model

    s1 = C.build(C.Stage1Config, profile, {"output_dir": str(tmp / f"s1_{seed}"),
                                           "data.source": data, "seed": seed})
    s2 = C.build(C.Stage2Config, profile, {"data.source": data, "seed": seed})
    records = load_dataset(s2.data)
    start = time.monotonic()
    stage1, _ = _stage1(s1, tmp / f"s1_{seed}")
    report_model, _, _, steps = _stage2(s2, stage1, llm, records, tmp / f"s2_{seed}",
                                        s2.epochs * -(-len(records["train"]) // s2.batch_size))
    outcome = evaluate_model(None, report_model=report_model, num_beams=1,
                             meteor=False, out_dir=tmp / f"eval_{seed}")
    m = outcome.metrics
    row = {col: float(m[key]) for col, key in METRICS.items() if key in m}
    row["over_head"] = row["coarse_f1"] / row["head_coarse_f1"]
    row["over_retrieval_coarse"] = row["coarse_f1"] - row["retrieval_coarse_f1"]
    row["over_retrieval_chexpert"] = row["chexpert_micro_f1"] - row["retrieval_chexpert_micro_f1"]
    row["minutes"] = (time.monotonic() - start) / 60
    row["steps"] = steps
    return row


def _summary(rows: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Per column: mean, sample SD (0 for one seed), min and max over the seeds (NaN skipped)."""
    frame = pd.DataFrame.from_dict(rows, orient="index")
    sd = frame.std(ddof=1) if len(frame) > 1 else frame.mean() * 0
    return {col: {"mean": frame[col].mean(), "sd": sd[col], "min": frame[col].min(),
                  "max": frame[col].max()} for col in frame.columns}


def _bars(data: str, summary: dict) -> list[str]:
    lines = []
    for col, op, bar in BARS.get(data, []):
        name, only = col.rsplit("_", 1) if col.endswith(("_mean", "_worst")) else (col, "")
        worst = summary[name]["max" if op == "<=" else "min"]
        checks = [("mean", summary[name]["mean"]), ("worst seed", worst)]
        checks = [c for c in checks if not only or c[0].startswith(only)]
        for label, value in checks:
            ok = value <= bar if op == "<=" else value >= bar if op == ">=" else value > bar
            lines.append(f"{'PASS' if ok else 'FAIL'}  {name} {label} {value:.3f} {op} {bar:g}")
    return lines


def _table(rows: dict[int, dict], summary: dict) -> str:
    cols = list(summary)
    head = "| seed | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = [f"| {seed} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |"
            for seed, row in rows.items()]
    for stat in ("mean", "sd", "min", "max"):
        body.append(f"| {stat} | " + " | ".join(f"{summary[c][stat]:.3f}" for c in cols) + " |")
    return head + "\n".join(body)


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--data", default="synthetic", show_default=True,
              help="synthetic (benchmark v1) or synthetic-v2")
@click.option("--seeds", multiple=True, type=int, default=(0, 1, 2), show_default=True)
@click.option("--llm", "llm_name", default="smollm2", show_default=True)
@click.option("--out", default=None, help="also write the table and the bars (markdown) here")
def main(profile: str, data: str, seeds: tuple[int, ...], llm_name: str, out: str | None):
    from pipeline import config as C
    from pipeline.models.llm_loading import load_llm

    torch.set_num_threads(2)
    base = C.build(C.Stage2Config, profile, {"llm.name": llm_name})
    llm = load_llm(base.llm.name, base.llm.cache_dir, base.llm.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="bench_seeds_"))
    rows = {}
    for seed in seeds:
        rows[seed] = _seed_row(profile, data, seed, llm, tmp)
        click.echo(f"seed {seed}: {json.dumps({k: round(v, 4) for k, v in rows[seed].items()})}",
                   err=True)
    summary = _summary(rows)
    text = (f"{data}, profile {profile}, seeds {list(seeds)}\n\n{_table(rows, summary)}\n\n"
            + "\n".join(_bars(data, summary)))
    click.echo("\n" + text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
