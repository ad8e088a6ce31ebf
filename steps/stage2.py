"""Stage 2: train vision + bridge against the frozen LLM with caption cross-entropy.

Reads: the data; initial weights (`init`: scratch / auto / latest / path / `runs:/` / `models:/`).
Writes: `stage2_train_log.csv`, `stage2_loss.png`, `stage2_config.json`, `stage2.log`,
`checkpoints/vision_bridge_vlm_{best_val,final,step<N>}.safetensors`, `val_reports/`; a
`report-vlm` version with alias `candidate`. Resumes a killed run with `--resume`;
`--nproc N` trains on N processes (torchrun, DDP; `batch_size` is per process).
"""
from __future__ import annotations

import click

from pipeline import config as C
from pipeline.stage2.job import Stage2Job
from pipeline.tracking.runs import end_active_run
from steps.common import (auto, device_option, distributed_world, nproc_option,
                          one_line_errors, profile_option)


@click.command()
@profile_option
@click.option("--config", "config_file", default=None, help="JSON config; explicit options win")
@click.option("--data", default=None, help="synthetic (default) or an annotation/CSV/JSONL path")
@click.option("--image_dir", "--image-dir", default=None)
@click.option("--epochs", default=None, help="default: the profile's")
@click.option("--lr", default=None, help="the bridge's; default 1e-3 (the original recipe: 2e-5)")
@click.option("--encoder_lr", "--encoder-lr", default=None,
              help="encoder + finding head; default 1e-4; 'same' = lr")
@click.option("--findings", default=None, type=click.Choice(["true", "false"]),
              help="classify-then-generate + auxiliary finding loss (default true; false = "
                   "the original plain visual-prefix recipe)")
@click.option("--adapter_rank", "--adapter-rank", default=None,
              help="LoRA rank of the LLM's adapters (the profile's: 8; tiny: 2); 0 = no "
                   "adapters, the LLM purely frozen")
@click.option("--adapter_lr", "--adapter-lr", default=None, help="the adapters' learning rate")
@click.option("--batch_size", "--batch-size", default=None, help="default 2")
@click.option("--max_visual_tokens", "--max-visual-tokens", default=None, help="default 96")
@click.option("--uncertain", type=click.Choice(["auto", "positive", "negative", "ignore"]),
              default=None,
              help="how the finding head's targets count an uncertain mention: positive "
                   "(U-ones, auto), negative (U-zeros) or ignore (masked from the loss)")
@click.option("--llm", default=None, help="smollm2 (offline default), tiny-random, HF folder, .gguf")
@click.option("--seed", default=None)
@click.option("--init", default="auto", show_default=True,
              help="auto (vision-bridge@stage2-ready) | latest (the newest fitting finished "
                   "Stage 2 run) | scratch | a checkpoint path | runs:/... | models:/...")
@click.option("--from_scratch", "--from-scratch", is_flag=True, help="same as --init scratch")
@click.option("--vision_checkpoint", "--vision-checkpoint", default=None,
              help="same as --init PATH_OR_URI")
@click.option("--force_init", "--force-init", is_flag=True,
              help="use an explicit checkpoint even if rejected by the gate or collapsed")
@click.option("--resume", default=None,
              help="'auto' or an interrupted run's output folder: continue it")
@click.option("--output_dir", "--output-dir", default="outputs/stage2", show_default=True)
@device_option
@nproc_option("steps.stage2")
@one_line_errors
def main(profile, config_file, data, image_dir, epochs, lr, encoder_lr, findings, adapter_rank,
         adapter_lr, batch_size, max_visual_tokens, uncertain, llm, seed, init, from_scratch,
         vision_checkpoint, force_init, resume, output_dir, device):
    """Train vision + bridge against the frozen LLM and register the result."""
    config_file = auto(config_file, str)
    cfg = C.build(C.Stage2Config, profile, {
        "data.source": data, "data.image_dir": image_dir, "epochs": auto(epochs, int),
        "lr": auto(lr, float), "batch_size": auto(batch_size, int),
        "llm.adapter_rank": auto(adapter_rank, int), "adapter_lr": auto(adapter_lr, float),
        "findings": None if findings is None else findings == "true",
        "bridge.max_visual_tokens": auto(max_visual_tokens, int), "llm.name": auto(llm, str),
        "data.uncertain": auto(uncertain, str), "seed": auto(seed, int),
        "output_dir": output_dir}, config_file=config_file)
    if encoder_lr is not None:
        cfg = C.replace_values(cfg, encoder_lr=None if encoder_lr == "same" else float(encoder_lr))
    init = "scratch" if from_scratch else (vision_checkpoint or init)
    with distributed_world(device) as world:
        job = Stage2Job(cfg, profile=profile, init=init, force_init=force_init,
                        resume=None if resume in (None, "", "none") else resume,
                        echo=lambda m: click.echo(m, err=True), world=world)
        result = job.run()
    if not world.is_main:
        return
    click.echo(f"stage2 done: first-step loss {result.first_step_loss:.4f}, final_train_loss "
               f"{result.final_train_loss:.4f}; run {job.run_id}; outputs in {job.out_dir}")
    end_active_run()


if __name__ == "__main__":
    main()
