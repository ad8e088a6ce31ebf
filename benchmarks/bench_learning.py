"""Which levers make the report model read the image: one table, same seed, same step budget.

Rows, each a Stage 2 run of the same number of steps, whole epochs (then greedy reports on the
test split):
  original recipe      vicreg Stage 1 (lr 1e-5) -> plain visual prefix, lr 2e-5 everywhere
  higher lr only       same init, plain prefix, lr 1e-3 everywhere
  + lr per module      same init, plain prefix, bridge 1e-3 / encoder 1e-4
  + classify-then-gen  same init, findings prompt + auxiliary finding loss
  chosen, promoted S1  findings Stage 1 -> the default Stage 2 recipe
  chosen, scratch      the default Stage 2 recipe from fresh weights
  frozen LLM           the recipe without LoRA adapters (the LLM purely frozen)
  + system turn        frozen LLM, the report writer's system turn instead of the assistant's
  + LoRA               adapters (rank 8) on q/k/v/o at adapter lr 5e-4 (then 1e-3)
  + decoding           repetition penalty 1.2 on top of the adapters
  + 2 epochs           the adapter recipe trained twice as long
  + findings first     adapters, each training report with its findings stated first
  blind baseline       the best constant training report
  classifier ceiling   the chosen model's finding head, scored directly (no LLM)
Columns: steps, minutes, val loss, grounding gap (test), coarse and fine finding F1, BLEU-4,
CIDEr, ROUGE-L, report form, self-contradicting and chat-preamble shares, distinct share; then,
on the text as written before any repair, against the findings in the prompt: prompt recall and
precision, self-contradicting share, share of reports the repair edited, share with an invented
size, and the report's coarse F1 over the head's (empty for a row without a finding head). No
MLflow: the trainers report into a throwaway sink.

    .venv/bin/python benchmarks/bench_learning.py --profile demo [--steps 254] [--out bench.md]
    .venv/bin/python benchmarks/bench_learning.py --rows promoted,scratch --steps 64  # two rows
    .venv/bin/python benchmarks/bench_learning.py --data synthetic-v2 --rows "LoRA r8"
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

REPORT_WRITER = "You are a radiologist. You write chest X-ray reports."
COLUMNS = ("steps", "minutes", "val_loss", "grounding_gap", "coarse_f1", "fine_f1", "bleu4",
           "cider", "rouge_l", "form", "contradict", "preamble", "distinct", "prompt_rec",
           "prompt_prec", "contradict_written", "repaired", "invented_size", "over_head")
_FROM_METRICS = {"coarse_f1": "finding_coarse_macro_f1", "fine_f1": "finding_macro_f1",
                 "bleu4": "bleu4", "cider": "cider", "rouge_l": "rouge_l", "form": "report_form",
                 "contradict": "contradiction_share", "preamble": "preamble_share",
                 "distinct": "distinct_share", "prompt_rec": "prompt_recall",
                 "prompt_prec": "prompt_precision",
                 "contradict_written": "contradiction_share_as_written",
                 "repaired": "repaired_share", "invented_size": "invented_size_share",
                 "over_head": "report_over_head_coarse_f1"}


def _stage1(cfg, out: Path):
    from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs

    inputs = build_stage1_inputs(cfg)
    trainer = Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images, out,
                            "bench", lambda m, s: None,
                            lambda t: None, logging.getLogger("bench"))
    start = time.monotonic()
    trainer.fit()
    return inputs.model, (time.monotonic() - start) / 60


def _stage2(cfg, init_model, llm, records, out: Path, steps: int):
    from pipeline.models.loading import load_into
    from pipeline.models.report_model import ReportModel
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.stage2.trainer import Stage2Trainer
    from pipeline.train.common import EpochLoaders, seed_everything

    seed_everything(cfg.seed)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size)
    if init_model is not None:
        load_into(model, init_model.state_dict(), "stage1")
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size,
                           cfg.batch_size, cfg.seed)
    epochs = max(1, -(-steps // loaders.batches_per_epoch))
    cfg = replace(cfg, epochs=epochs, llm_checksum=False, n_val_reports=0,
                  checkpoint_every=10**9)
    trainer = Stage2Trainer(cfg, model, llm, loaders, out, "bench", lambda m, s: None,
                            lambda t: None, logging.getLogger("bench"))
    start = time.monotonic()
    result = trainer.fit()
    minutes = (time.monotonic() - start) / 60
    val_loss = trainer.epoch_history["val_loss"][-1][1]
    # Written as the saved model writes: the training reports' style and token limit.
    report_model = ReportModel(model.eval(), llm, cfg, trainer.style, trainer.report_token_limit)
    return report_model, minutes, val_loss, trainer.state.step


def _row(report_model, records, out: Path) -> dict:
    from pipeline.evaluate.evaluation import evaluate_model

    outcome = evaluate_model(None, report_model=report_model, num_beams=1, meteor=False,
                             out_dir=out)
    m = outcome.metrics
    row = {col: m.get(f"greedy_{key}") for col, key in _FROM_METRICS.items()}
    blind = {col: m[f"blind_{key}"] for col, key in _FROM_METRICS.items() if f"blind_{key}" in m}
    blind.update(distinct=1 / len(records["test"]), preamble=0.0)
    return {"grounding_gap": m["grounding_gap"], **row, "_blind": blind}


def _ceiling(model, records, image_size: int) -> dict:
    from pipeline.data import image_batch
    from pipeline.data.finding_metrics import label_f1

    with torch.no_grad():
        logits = model.eval().forward_with_findings(image_batch(records["test"], image_size))[1]
    scores = label_f1([r.report for r in records["test"]], model.decode_findings(logits))
    return {"coarse_f1": scores["finding_coarse_macro_f1"], "fine_f1": scores["finding_macro_f1"]}


def _table(rows: dict[str, dict]) -> str:
    head = "| row | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    lines = []
    for name, row in rows.items():
        cells = []
        for col in COLUMNS:
            value = row.get(col)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float)
                         else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


@click.command()
@click.option("--profile", default="demo", show_default=True)
@click.option("--steps", default=254, show_default=True,
              help="Stage 2 steps of every row, rounded up to whole epochs (the table shows "
                   "the steps run)")
@click.option("--llm", "llm_name", default="smollm2", show_default=True)
@click.option("--data", default="synthetic", show_default=True,
              help="synthetic (benchmark v1) or synthetic-v2 (eleven CheXpert observations)")
@click.option("--out", default=None, help="also write the table (markdown) here")
@click.option("--rows", default="", help="only the rows whose name contains one of these "
              "comma-separated words (e.g. 'promoted,scratch'); all when empty")
def main(profile: str, steps: int, llm_name: str, data: str, out: str | None,
         rows: str) -> None:
    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.models.llm_loading import load_llm

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench_learning_"))
    s1_base = C.build(C.Stage1Config, profile, {"output_dir": str(tmp / "s1"),
                                                "data.source": data})
    s2_base = C.build(C.Stage2Config, profile, {"llm.name": llm_name, "data.source": data})
    llm = load_llm(s2_base.llm.name, s2_base.llm.cache_dir, s2_base.llm.dtype)
    records = load_dataset(s2_base.data)

    plain = dict(findings=False, aux_finding_weight=0.0)
    frozen = {"llm": replace(s2_base.llm, adapter_rank=0), "system_prompt": None,
              "repetition_penalty": 1.0, "findings_first": False}
    lora = {"llm": replace(s2_base.llm, adapter_rank=8), "system_prompt": REPORT_WRITER,
            "repetition_penalty": 1.0, "findings_first": False}
    variants = {  # name: (Stage 1 it starts from, Stage 2 changes)
        "frozen LLM (no adapters, assistant turn)": ("findings", frozen),
        "+ system turn (frozen LLM)": ("findings", dict(frozen, system_prompt=REPORT_WRITER)),
        "+ LoRA r8, adapter lr 5e-4": ("findings", dict(lora, adapter_lr=5e-4)),
        "+ LoRA r8, adapter lr 1e-3": ("findings", dict(lora, adapter_lr=1e-3)),
        "+ LoRA 1e-3, repetition penalty 1.2": ("findings", dict(lora, adapter_lr=1e-3,
                                                                 repetition_penalty=1.2)),
        "+ LoRA 5e-4, 2 epochs": ("findings", dict(lora, adapter_lr=5e-4, epochs_factor=2)),
        "+ LoRA 5e-4, findings first": ("findings", dict(lora, adapter_lr=5e-4,
                                                         findings_first=True)),
        "original recipe (vicreg S1, lr 2e-5)": ("vicreg", dict(plain, lr=2e-5, encoder_lr=None)),
        "higher lr only (1e-3)": ("vicreg", dict(plain, lr=1e-3, encoder_lr=None)),
        "+ lr per module (1e-3 / 1e-4)": ("vicreg", dict(plain)),
        "+ classify-then-generate": ("vicreg", {}),
        "chosen, from promoted findings S1": ("findings", {}),
        "chosen, from scratch": (None, {}),
    }
    wanted = [word.strip() for word in rows.split(",") if word.strip()]
    variants = {name: v for name, v in variants.items()
                if not wanted or any(word in name for word in wanted)}
    if not variants:
        raise click.UsageError(f"--rows {rows!r} names no row")
    needed = {init for init, _ in variants.values()}
    stage1_configs = {"vicreg": replace(s1_base, objective="vicreg", lr=1e-5, batch_size=2,
                                        epochs=3),
                      "findings": s1_base}
    stage1 = {name: _stage1(cfg, tmp / f"s1_{name}") for name, cfg in stage1_configs.items()
              if name in needed}  # name: (model, minutes)
    table_rows: dict[str, dict] = {}
    chosen = None
    for name, (init_name, changes) in variants.items():
        init = stage1[init_name][0] if init_name else None
        changes = dict(changes)
        factor = changes.pop("epochs_factor", 1)
        cfg = replace(s2_base, **changes)
        report_model, minutes, val_loss, steps_run = _stage2(
            cfg, init, llm, records, tmp / name.replace(" ", "_"), steps * factor)
        row = _row(report_model, records, tmp / "eval")
        blind = row.pop("_blind")
        table_rows[name] = {"steps": steps_run, "minutes": minutes, "val_loss": val_loss, **row}
        click.echo(f"{name}: {table_rows[name]}", err=True)
        if name.startswith("chosen, from promoted"):
            chosen = report_model
    table_rows["blind baseline"] = blind
    if chosen is not None:
        table_rows["classifier ceiling (chosen head)"] = _ceiling(chosen.model, records,
                                                                  s2_base.encoder.image_size)
    table = _table(table_rows)
    trained = ", ".join(f"{name} {minutes:.1f} min" for name, (_, minutes) in stage1.items())
    click.echo(f"\nStage 1: {trained or 'none'}; Stage 2 rows: {steps} steps asked, whole "
               f"epochs run, seed {s2_base.seed}, profile {profile}\n")
    click.echo(table)
    if out:
        Path(out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
