"""The frozen causal LLM: a wrapper that freezes itself (loading lives in `llm_loading`).

`FrozenLLM` is the only code that touches the LLM's `requires_grad`. It takes embeddings in
(visual tokens + prompt/report embeddings) and returns the HF output, or decoded strings from
`generate`.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class TrainableLLMError(RuntimeError):
    """Some parameter of the frozen LLM would receive gradients."""


class LLMLoadError(RuntimeError):
    """An LLM that cannot be resolved to a model offline or used for generation."""


class FrozenLLM(nn.Module):
    """A causal LM + tokenizer, frozen at construction and kept in eval mode."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise LLMLoadError("the tokenizer has no EOS token; generation could never stop")
        # Batches are masked by position, so pad may safely share eos's id (SmolLM2 does).
        self.pad_from_eos = tokenizer.pad_token_id is None
        if self.pad_from_eos:
            tokenizer.pad_token = tokenizer.eos_token
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenLLM":
        """Always eval: dropout in a frozen LLM would only add noise to the caption loss."""
        return super().train(False)

    # --- guards -------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        """Names of parameters that currently require grad (should be empty)."""
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def assert_frozen(self) -> None:
        """Raise `TrainableLLMError` naming every parameter that requires grad."""
        names = self.trainable_parameter_names()
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise TrainableLLMError(f"{len(names)} LLM parameter(s) require grad: {shown}")

    def checksum(self) -> str:
        """sha256 over every parameter (name, dtype, shape, bytes) in name order."""
        hasher = hashlib.sha256()
        for name, param in sorted(self.model.named_parameters()):
            tensor = param.detach().cpu().contiguous()
            hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            # Viewing as bytes hashes bf16 too and feeds the buffer without a copy.
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
        return hasher.hexdigest()

    # --- properties ---------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def pad_is_eos(self) -> bool:
        return self.pad_token_id == self.eos_token_id

    # --- embeddings ---------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token-embedding lookup: (B, T) ids -> (B, T, hidden_size)."""
        return self.model.get_input_embeddings()(input_ids)

    def embedding_table(self) -> torch.Tensor:
        """The (vocab, hidden_size) input-embedding weight, detached, for alignment losses."""
        return self.model.get_input_embeddings().weight.detach()

    # --- forward / generate -------------------------------------------------------------
    def _check_inputs(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"inputs_embeds must be (B, T, {self.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        if tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                             f"inputs_embeds {tuple(inputs_embeds.shape[:2])}")

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None):
        """HF causal-LM output; `loss` is shifted CE ignoring -100 when labels are given."""
        self._check_inputs(inputs_embeds, attention_mask)
        if labels is not None and tuple(labels.shape) != tuple(attention_mask.shape):
            raise ValueError(f"labels {tuple(labels.shape)} do not match "
                             f"attention_mask {tuple(attention_mask.shape)}")
        # Cast rather than refuse: an fp32 bridge may feed a bf16 LLM; autograd follows the cast.
        return self.model(inputs_embeds=inputs_embeds.to(self.dtype),
                          attention_mask=attention_mask, labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, num_beams: int = 1, **kw) -> list[str]:
        """Decode continuations of the embedded prompts (greedy unless `kw` says otherwise)."""
        self._check_inputs(inputs_embeds, attention_mask)
        inputs_embeds, attention_mask = left_align(inputs_embeds.to(self.dtype), attention_mask)
        kw.setdefault("do_sample", False)
        # With inputs_embeds and no input_ids a decoder-only HF model returns only new tokens.
        new_ids = self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            max_new_tokens=max_new_tokens, num_beams=num_beams,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, **kw)
        return self.decode_new_tokens(new_ids)

    def decode_new_tokens(self, new_ids: torch.Tensor) -> list[str]:
        """Strings from generated ids, each cut at its first EOS (what follows is padding)."""
        texts = []
        for row in new_ids.tolist():
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts


def left_align(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid positions to the right end, as generation needs left padding."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt in rows {torch.nonzero(lengths == 0).flatten().tolist()}")
    first = mask.int().argmax(dim=1)
    last_plus_one = mask.shape[1] - mask.flip(1).int().argmax(dim=1)
    holes = (last_plus_one - first) != lengths
    if holes.any():
        raise ValueError("attention_mask rows must be one contiguous run of ones; rows with "
                         f"holes: {torch.nonzero(holes).flatten().tolist()}")
    # Right-shift each row by its trailing padding; a no-op for already left-padded input.
    shift = mask.shape[1] - last_plus_one  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)
    source = (positions[None, :] - shift[:, None]) % mask.shape[1]  # (B, T)
    aligned = torch.gather(inputs_embeds, 1, source[..., None].expand_as(inputs_embeds))
    return aligned, torch.gather(attention_mask, 1, source)
