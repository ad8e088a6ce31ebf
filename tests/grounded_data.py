"""Tiny CSV datasets for grounding tests: the report is decided by the image, or by nothing."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

REPORTS = ("There is a small left pleural effusion.", "The heart is enlarged.")


def write_dataset(folder: Path, informative: bool, n_train: int = 24, n_eval: int = 8) -> Path:
    """A CSV (image, report, split) of 32x32 PNGs. Informative: the bright half (left or
    right) decides the report. Uninformative: every image is the same, reports alternate."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    splits = ["train"] * n_train + ["val"] * n_eval + ["test"] * n_eval
    same = (rng.random((32, 32)) * 80).astype(np.uint8)
    for i, split in enumerate(splits):
        label = i % 2
        if informative:  # effusion: a bright left half; enlarged heart: a bright centre
            pixels = (rng.random((32, 32)) * 40).astype(np.uint8)
            if label == 0:
                pixels[:, :16] += 180
            else:
                pixels[8:24, 8:24] += 180
        else:
            pixels = same
        name = f"img{i:03d}.png"
        Image.fromarray(pixels, mode="L").save(folder / name)
        rows.append({"id": f"s{i:03d}", "image": name, "report": REPORTS[label], "split": split})
    path = folder / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "report", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def pretrained_tiny_llm(folder: Path, steps: int = 120) -> Path:
    """The tiny random LM, briefly trained to write each report after its findings prompt
    (a stand-in for an instruct LLM that follows a findings prompt), saved as an HF folder."""
    import torch

    from pipeline.config import Stage2Config
    from pipeline.data.labeler import label_report
    from pipeline.models.captioning import encode_prompt
    from pipeline.models.findings import findings_text
    from pipeline.models.tiny_lm import build_tiny_llm

    llm = build_tiny_llm(vocab_texts=list(REPORTS))
    tok, model = llm.tokenizer, llm.model
    prompt = Stage2Config().prompt
    rows = [list(encode_prompt(tok, f"{findings_text(label_report(r))}\n{prompt}"))
            + tok(r, add_special_tokens=False)["input_ids"] + [llm.eos_token_id] for r in REPORTS]
    for p in model.parameters():
        p.requires_grad_(True)  # a test fixture training its own LM, not pipeline code
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for row in rows:
            ids = torch.tensor([row])
            prefix = torch.randn((1, 4, model.config.hidden_size), generator=gen) * 0.05
            embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], 1)
            labels = torch.cat([torch.full((1, 4), -100), ids], 1)
            loss = model(inputs_embeds=embeds, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
