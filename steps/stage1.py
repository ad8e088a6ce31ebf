"""Stage 1: train vision + bridge without the LLM.

Reads: the data (`synthetic` or an annotation/CSV/JSONL path); with `--resume`, an interrupted
run's last step checkpoint.
Writes (run artifacts): `checkpoints/vision_bridge_{best_val,final,step<N>}.safetensors`,
`logs/stage1_lr{lr}_bs{bs}_{YYYYmmdd_HHMM}.log`, `stage1_train_log.csv`,
`plots/stage1_curves.png`, `config/stage1_config.json`; metrics `train_loss`, `val_loss`,
`health_*`, `final_train_loss`. `--nproc N` trains on N processes (torchrun, DDP).
"""
from __future__ import annotations

import click

from pipeline import config as C
from pipeline.stage1.job import Stage1Job
from steps.common import (auto, device_option, distributed_world, nproc_option,
                          one_line_errors, profile_option)


@click.command()
@profile_option
@click.option("--data", default="synthetic", show_default=True)
@click.option("--image_dir", "--image-dir", default=None)
@click.option("--epochs", default="auto", help="default: the profile's")
@click.option("--lr", default="auto", show_default=True,
              help="default 1e-3 (the original vicreg recipe: 1e-5)")
@click.option("--batch_size", "--batch-size", default="auto", show_default=True,
              help="per process; default: the profile's (16; tiny: 2)")
@click.option("--objective", type=click.Choice(["auto", "findings", "vicreg", "l2_proxy"]),
              default="auto", show_default=True,
              help="findings (default) and vicreg cannot collapse; l2_proxy is the old proxy")
@click.option("--max_visual_tokens", "--max-visual-tokens", default="96", show_default=True)
@click.option("--uncertain", type=click.Choice(["auto", "positive", "negative", "ignore"]),
              default="auto", show_default=True,
              help="how the finding head's targets count an uncertain mention: positive "
                   "(U-ones, auto), negative (U-zeros) or ignore (masked from the loss)")
@click.option("--seed", default="0", show_default=True)
@click.option("--resume", default=None,
              help="'auto' or an interrupted run's output folder: continue it (its config wins)")
@click.option("--output_dir", "--output-dir", default="outputs/stage1", show_default=True)
@device_option
@nproc_option("steps.stage1")
@one_line_errors
def main(profile, data, image_dir, epochs, lr, batch_size, objective, max_visual_tokens,
         uncertain, seed, resume, output_dir, device):
    """Train vision + bridge (no LLM) and track the run in MLflow."""
    cfg = C.build(C.Stage1Config, profile, {
        "data.source": data, "data.image_dir": image_dir, "epochs": auto(epochs, int),
        "lr": auto(lr, float), "batch_size": auto(batch_size, int), "objective": auto(objective, str),
        "bridge.max_visual_tokens": auto(max_visual_tokens, int), "seed": auto(seed, int),
        "data.uncertain": auto(uncertain, str), "output_dir": output_dir})
    with distributed_world(device) as world:
        Stage1Job(cfg, profile=profile, resume=None if resume in (None, "", "none") else resume, world=world,
                  echo=lambda m: click.echo(m, err=True)).run()


if __name__ == "__main__":
    main()
