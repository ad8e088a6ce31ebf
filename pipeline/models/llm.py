"""The frozen causal LLM: a wrapper that freezes itself (loading lives in `llm_loading`).

`FrozenLLM` is the only code that touches the LLM's `requires_grad`. It takes embeddings in
(visual tokens + prompt/report embeddings) and returns the HF output, or decoded strings from
`generate`.

LoRA adapters (`peft`, injected in place) are the only LLM tensors that may train: the base
weights stay frozen and bit-identical. Injection renames a wrapped projection's weight from
`q_proj.weight` to `q_proj.base_layer.weight`; the base checksum strips that part, so it is
the same number before injection, after it and after training.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class TrainableLLMError(RuntimeError):
    """Some parameter of the frozen LLM would receive gradients."""


class LLMLoadError(RuntimeError):
    """An LLM that cannot be resolved to a model offline or used for generation."""


ADAPTER_PREFIX = "llm_adapter"  # checkpoint key prefix of the adapter tensors
ADAPTER_MARK = "lora_"  # peft's adapter tensors: lora_A / lora_B (and lora_embedding_*)


def is_adapter_name(name: str) -> bool:
    """True for a LoRA adapter parameter's name."""
    return ADAPTER_MARK in name


def base_name(name: str) -> str:
    """A base parameter's name as the model had it before adapters were injected."""
    return name.replace(".base_layer", "")


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
        self.adapter_spec: tuple | None = None  # (rank, alpha, targets) once adapters exist
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenLLM":
        """Always eval: dropout in a frozen LLM would only add noise to the caption loss."""
        return super().train(False)

    # --- adapters -----------------------------------------------------------------------
    def add_adapters(self, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
        """Inject LoRA adapters (rank, alpha) into the `targets` projections and make them,
        and only them, trainable; adapters already there with the same spec are kept."""
        spec = (int(rank), float(alpha), tuple(targets))
        if self.adapter_spec == spec:
            self.use_adapters(True)
            return
        if self.adapter_spec is not None:
            raise TrainableLLMError(f"this LLM already carries adapters {self.adapter_spec}; "
                                    f"load a fresh one for adapters {spec}")
        from peft import LoraConfig, inject_adapter_in_model

        self.assert_frozen()  # peft would freeze a trainable base tensor silently: refuse it
        config = LoraConfig(r=spec[0], lora_alpha=spec[1], target_modules=list(spec[2]),
                            lora_dropout=0.0, bias="none")
        inject_adapter_in_model(config, self.model)
        if not self.named_adapter_parameters():
            raise LLMLoadError(f"no module of this LLM matches the adapter targets {spec[2]}")
        for name, param in self.model.named_parameters():
            param.requires_grad_(is_adapter_name(name))
        self.adapter_spec = spec

    def _adapter_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def use_adapters(self, enabled: bool) -> None:
        """Switch the adapters on (the trained LLM) or off (the base LLM, bit for bit)."""
        for layer in self._adapter_layers():
            layer.enable_adapters(enabled)
        for _, param in self.named_adapter_parameters():  # enable_adapters touches grads
            param.requires_grad_(enabled)

    def reset_adapters(self) -> None:
        """Fresh adapters (B = 0: the LLM's function is the base's), from torch's RNG."""
        for layer in self._adapter_layers():
            for name in list(getattr(layer, "lora_A", {})):
                layer.reset_lora_parameters(name, True)

    def named_adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The adapter parameters, by name (empty without adapters)."""
        return [(n, p) for n, p in self.model.named_parameters() if is_adapter_name(n)]

    def named_base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The base LLM's parameters (never trained), by their names in the model."""
        return [(n, p) for n, p in self.model.named_parameters() if not is_adapter_name(n)]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Adapter tensors by name, detached (for checkpoints)."""
        return {n: p.detach() for n, p in self.named_adapter_parameters()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved adapter tensors in; every adapter must be given, nothing else."""
        own = dict(self.named_adapter_parameters())
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise LLMLoadError(f"adapter tensors do not fit this LLM's adapters (missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name].to(param.dtype))

    # --- guards -------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        """Names of base parameters that currently require grad (should be empty)."""
        return [name for name, p in self.named_base_parameters() if p.requires_grad]

    def assert_frozen(self) -> None:
        """Raise `TrainableLLMError` naming every base parameter that requires grad (adapter
        parameters may train)."""
        names = self.trainable_parameter_names()
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise TrainableLLMError(f"{len(names)} LLM parameter(s) require grad: {shown}")

    def checksum(self) -> str:
        """sha256 over every base parameter (name before adapters, dtype, shape, bytes) in
        name order; adapters are not part of it."""
        hasher = hashlib.sha256()
        for name, param in sorted((base_name(n), p) for n, p in self.named_base_parameters()):
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


def prepare_adapters(llm: FrozenLLM, llm_cfg, tensors: dict[str, torch.Tensor] | None = None
                     ) -> None:
    """Give `llm` the adapters `llm_cfg` asks for: fresh ones, or `tensors` (a checkpoint's,
    without their prefix); with `adapter_rank` 0, any adapters it carries are switched off."""
    if llm_cfg.adapter_rank <= 0:
        if tensors:
            raise LLMLoadError("the checkpoint holds LLM adapters but its config has none")
        if llm.adapter_spec is not None:
            llm.use_adapters(False)
        return
    llm.add_adapters(llm_cfg.adapter_rank, llm_cfg.adapter_alpha, tuple(llm_cfg.adapter_targets))
    if tensors is None:
        llm.reset_adapters()
    else:
        llm.load_adapter_state(tensors)
