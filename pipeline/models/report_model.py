"""Report generation from images: vision-bridge -> [visual][prompt] -> frozen LLM decode."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models import captioning
from pipeline import config as C


@torch.no_grad()
def generate_reports(model, llm, images: torch.Tensor, prompt: str, max_new_tokens: int,
                     num_beams: int = 1, batch_size: int = 8, **generate_kwargs) -> list[str]:
    """One report per image (greedy when num_beams == 1)."""
    model.eval()
    prompt_ids = captioning.encode_prompt(llm.tokenizer, prompt)
    out: list[str] = []
    for start in range(0, images.shape[0], batch_size):
        visual = model(images[start:start + batch_size])
        embeds, mask = captioning.prompt_only(visual, prompt_ids, llm.embed)
        out += llm.generate(embeds, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                            **generate_kwargs)
    return [text.strip() for text in out]


@dataclass
class ReportModel:
    """A trained Stage 2 model ready to write reports."""

    model: torch.nn.Module
    llm: object
    cfg: C.Stage2Config

    def generate(self, images: torch.Tensor, num_beams: int = 1, max_new_tokens: int | None = None,
                 **kwargs) -> list[str]:
        """Reports for a batch of images (B, 1, S, S)."""
        return generate_reports(self.model, self.llm, images, self.cfg.prompt,
                                max_new_tokens or self.cfg.max_new_tokens, num_beams, **kwargs)


def load_report_model(checkpoint: str | Path, llm=None, cache_dir: str | None = None) -> ReportModel:
    """Rebuild vision-bridge + LLM from a Stage 2 checkpoint (the LLM is loaded by name)."""
    from pipeline.models.llm import load_llm
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.stage2.init import load_into, weights_of

    tensors, metadata = weights_of(Path(checkpoint))
    raw = metadata.get("config")
    cfg = C.from_dict(C.Stage2Config, raw) if isinstance(raw, dict) else C.Stage2Config()
    if llm is None:
        llm = load_llm(cfg.llm.name, cache_dir=cache_dir or cfg.llm.cache_dir, dtype=cfg.llm.dtype)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size)
    load_into(model, tensors, checkpoint)
    return ReportModel(model.eval(), llm, cfg)
