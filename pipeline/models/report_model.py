"""Report generation from images: vision-bridge -> [visual][prompt] -> frozen LLM decode."""
from __future__ import annotations

from dataclasses import dataclass

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
