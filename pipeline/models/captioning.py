"""Stage 2 sequence layout and labels: [visual tokens][prompt][report][EOS], right-padded.

Each sample has its own prompt (classify-then-generate puts that image's predicted findings
in it), so segment lengths are per sample.

Labels are the report and EOS token ids at their own positions (HF shifts them inside the
loss) and -100 everywhere else. Padding is defined by position (the attention mask), never
by token id, so EOS stays supervised when the tokenizer's pad token is EOS.

`make_labels` builds labels; `report_positions` derives the supervised positions from the
segment lengths alone. The label-mask guard compares the two, so a broken `make_labels`
cannot go unnoticed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.device import to_device
from pipeline.guards import IGNORE_INDEX


@dataclass(frozen=True)
class Layout:
    """Token ids and segment lengths of one right-padded batch (visual tokens excluded)."""

    n_visual: int
    prompt_ids: tuple[tuple[int, ...], ...]  # per sample
    report_ids: tuple[tuple[int, ...], ...]  # report tokens + EOS, per sample
    pad_id: int
    truncated: int  # how many reports were cut to max_report_tokens

    @property
    def text_length(self) -> int:
        return max(len(p) + len(r) for p, r in zip(self.prompt_ids, self.report_ids))

    @property
    def length(self) -> int:
        return self.n_visual + self.text_length


def encode_prompt(tokenizer, prompt: str, system: str | None = None) -> tuple[int, ...]:
    """Prompt token ids; in the LLM's chat format (a user turn, then the assistant's start)
    when its tokenizer has a chat template, so an instruct LLM answers with the report.
    `system` replaces the template's own system turn (SmolLM2's names a helpful assistant,
    which invites an assistant's answer and leaks into reports); None keeps it."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "system", "content": system}] if system else []
        text = tokenizer.apply_chat_template(turns + [{"role": "user", "content": prompt.strip()}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_batch(tokenizer, prompt: str | Sequence[str], reports: list[str], eos_id: int,
                   pad_id: int, n_visual: int, max_report_tokens: int,
                   system: str | None = None) -> Layout:
    """Tokenize prompts (one, or one per report) and reports (no special tokens added) and
    append EOS to each report."""
    prompts = [prompt] * len(reports) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(reports):
        raise ValueError(f"{len(prompts)} prompts for {len(reports)} reports")
    prompt_ids, report_ids, truncated = [], [], 0
    for text, report in zip(prompts, reports):
        ids_p = encode_prompt(tokenizer, text, system)
        # A report follows the prompt's final newline directly; after other text, a space.
        lead = "" if tokenizer.decode(ids_p[-1:]).endswith(("\n", " ")) else " "
        ids = tokenizer(lead + report.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) > max_report_tokens:
            ids, truncated = ids[:max_report_tokens], truncated + 1
        prompt_ids.append(ids_p)
        report_ids.append(tuple(ids) + (eos_id,))
    return Layout(n_visual, tuple(prompt_ids), tuple(report_ids), pad_id, truncated)


def text_ids(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the text part (B, T): prompt + report + EOS, right-padded with pad_id."""
    T = layout.text_length
    ids = torch.full((len(layout.report_ids), T), layout.pad_id, dtype=torch.long)
    mask = torch.zeros((len(layout.report_ids), T), dtype=torch.long)
    for i, (prompt, report) in enumerate(zip(layout.prompt_ids, layout.report_ids)):
        row = prompt + report
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def make_labels(layout: Layout) -> torch.Tensor:
    """Labels (B, L) over the full sequence: report + EOS ids, -100 elsewhere."""
    ids, _ = text_ids(layout)
    labels = torch.full((ids.shape[0], layout.length), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, report) in enumerate(zip(layout.prompt_ids, layout.report_ids)):
        start = layout.n_visual + len(prompt)
        labels[i, start:start + len(report)] = torch.tensor(report, dtype=torch.long)
    return labels


def report_positions(layout: Layout) -> torch.Tensor:
    """Bool (B, L): True exactly on report + EOS positions, from segment lengths only."""
    positions = torch.arange(layout.length).unsqueeze(0)  # (1, L)
    start = layout.n_visual + torch.tensor([len(p) for p in layout.prompt_ids]).unsqueeze(1)
    lengths = torch.tensor([len(r) for r in layout.report_ids]).unsqueeze(1)  # (B, 1)
    return (positions >= start) & (positions < start + lengths)


def token_weights(layout: Layout, stated: Sequence[int], weight: float) -> torch.Tensor:
    """Float (B, L): `weight` on the first `stated[i]` report tokens of row i, 1 on the rest of
    the report and its EOS, 0 elsewhere (where labels are -100)."""
    weights = report_positions(layout).float()
    for i, (prompt, n) in enumerate(zip(layout.prompt_ids, stated)):
        start = layout.n_visual + len(prompt)
        weights[i, start:start + min(int(n), len(layout.report_ids[i]) - 1)] = weight
    return weights


def _shifted(labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) of next-token predictions: shifted by one, as the causal LM's own
    loss is (shift the targets, not the logits, as transformers' own loss does: no copy of the
    (B, L, vocab) logits beyond the fp32 upcast)."""
    pad = torch.nn.functional.pad
    return pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:], pad(weights, (0, 1))[:, 1:]


def total_weight(labels: torch.Tensor, weights: torch.Tensor) -> float:
    """The total weight of the supervised next-token predictions: what the weighted mean
    divides by. Read where the labels are built (the host): on a GPU it would be a sync."""
    targets, w = _shifted(labels, weights)
    return float((w * (targets != IGNORE_INDEX).float()).sum())


def weighted_caption_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                          total: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(plain mean CE, weighted mean CE, total weight) of next-token predictions, shifted by
    one as the causal LM's own loss is. `labels` and `weights` go to the logits' device;
    `total` (`total_weight`, read on the host) saves a read of the device."""
    labels, weights = to_device(labels, logits.device), to_device(weights, logits.device)
    targets, w = _shifted(labels, weights)
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                           ignore_index=IGNORE_INDEX,
                                           reduction="none").view_as(w)
    supervised = (targets != IGNORE_INDEX).float()
    if total is None:
        total = float((w * supervised).sum())
    plain = (ce * supervised).sum() / supervised.sum().clamp(min=1)
    return plain, (ce * w * supervised).sum() / max(total, 1e-8), total


def assemble(visual_tokens: torch.Tensor, layout: Layout, embed) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds (B, L, H), attention_mask (B, L)) with the visual tokens first."""
    ids, text_mask = text_ids(layout)
    device = visual_tokens.device
    text_embeds = embed(to_device(ids, device)).to(visual_tokens.dtype)
    B, V = visual_tokens.shape[:2]
    # the visual part of the mask is made where it is used; only the text's comes from the host
    visual_mask = torch.ones((B, V), dtype=text_mask.dtype, device=device)
    inputs_embeds = torch.cat([visual_tokens, text_embeds], dim=1)
    attention_mask = torch.cat([visual_mask, to_device(text_mask, device)], dim=1)
    return inputs_embeds, attention_mask


def prompt_only(visual_tokens: torch.Tensor, prompt_ids: Sequence[Sequence[int]], pad_id: int,
                embed) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask) of [visual][prompt] per sample, right-padded, for
    generation (the LLM wrapper left-aligns them)."""
    B, V = visual_tokens.shape[:2]
    T = max(len(p) for p in prompt_ids)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, V + T), dtype=torch.long)
    mask[:, :V] = 1
    for i, prompt in enumerate(prompt_ids):
        ids[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        mask[i, V:V + len(prompt)] = 1
    embeds = torch.cat([visual_tokens, embed(ids.to(visual_tokens.device)).to(visual_tokens.dtype)], 1)
    return embeds, mask.to(visual_tokens.device)
