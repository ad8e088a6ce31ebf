"""A Stage 2 step's time divided by the frozen LLM's own forward+backward (the floor).

Both are measured in one run, interleaved step by step, at the same batch and sequence
length: the floor is the LLM alone on random input embeddings of the Stage 2 sequence's
shape (backward to those embeddings, as in Stage 2); the step is the whole Stage 2 training
step (encoder + bridge forward, sequence assembly, LLM forward/backward, encoder backward,
optimizer). The difference is what the vision side costs.

    .venv/bin/python benchmarks/bench_stage2.py [--profile default] [--llm smollm2] [--steps 8]
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time

import click
import torch


@click.command()
@click.option("--profile", default="default", show_default=True, help="encoder size")
@click.option("--llm", "llm_name", default="smollm2", show_default=True)
@click.option("--steps", default=8, show_default=True)
def main(profile: str, llm_name: str, steps: int) -> None:
    from pipeline.models import captioning
    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.models.llm_loading import load_llm
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.stage2.trainer import Stage2Trainer
    from pipeline.train.common import EpochLoaders

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    cfg = C.build(C.Stage2Config, profile, {"llm.name": llm_name, "data.root": "data",
                                            "llm_checksum": False})
    llm = load_llm(cfg.llm.name, cfg.llm.cache_dir)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size)
    records = load_dataset(cfg.data)
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size,
                           cfg.batch_size, cfg.seed)
    trainer = Stage2Trainer(cfg, model, llm, loaders, tmp, "bench", lambda m, s: None,
                            lambda t: None, logging.getLogger("bench"))
    trainer._t0 = time.monotonic()
    batches = list(loaders.epoch(1))[: steps + 2]
    step_times, floor_times, lengths = [], [], []
    for i, batch in enumerate(batches):
        layout = captioning.tokenize_batch(llm.tokenizer, cfg.prompt, batch["reports"],
                                           llm.eos_token_id, llm.pad_token_id,
                                           model.num_visual_tokens, cfg.max_report_tokens)
        B, L = len(batch["reports"]), layout.length
        labels = captioning.make_labels(layout)
        _, mask = captioning.text_ids(layout)
        mask = torch.cat([torch.ones(B, model.num_visual_tokens, dtype=mask.dtype), mask], 1)
        embeds = (0.02 * torch.randn(B, L, llm.hidden_size)).requires_grad_(True)
        start = time.perf_counter()
        llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
        floor = time.perf_counter() - start
        start = time.perf_counter()
        trainer._step(batch, epoch=1)
        step = time.perf_counter() - start
        if i >= 2:  # warm-up
            floor_times.append(floor)
            step_times.append(step)
            lengths.append(L)
    s, f = statistics.median(step_times), statistics.median(floor_times)
    print(f"profile={profile} encoder d_model={cfg.encoder.d_model} depth={cfg.encoder.depth} "
          f"image={cfg.encoder.image_size} visual_tokens={model.num_visual_tokens} "
          f"llm={llm_name} batch={cfg.batch_size} seq_len median={statistics.median(lengths)}")
    print(f"  stage2 step   median {1000 * s:8.1f} ms  (n={len(step_times)})")
    print(f"  LLM fwd+bwd   median {1000 * f:8.1f} ms  (the floor)")
    ratio = s / f
    print(f"  ratio step/floor = {ratio:.3f} ({'PASS' if ratio < 1.3 else 'FAIL'}: target < 1.3)")


if __name__ == "__main__":
    main()
