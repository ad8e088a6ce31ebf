"""A tiny random causal LM built in-process: the `tiny-random` LLM of tests and the tiny profile.

A small `LlamaForCausalLM` (tied embeddings, like SmolLM2) with a byte-level BPE tokenizer
trained in milliseconds on a built-in radiology corpus, so nothing is downloaded and any text
round-trips without unknown tokens.
"""
from __future__ import annotations

import torch

from pipeline.models.llm import FrozenLLM

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"

# Sentence-cased and lower-cased so common report words become single tokens either way.
_CORPUS = (
    "The lungs are clear. There is no focal consolidation, pleural effusion or pneumothorax.",
    "Heart size is normal. The cardiomediastinal silhouette is within normal limits.",
    "No acute cardiopulmonary process. Mild bibasilar atelectasis is noted.",
    "The heart is mildly enlarged. Pulmonary vascular congestion and interstitial edema.",
    "Small left pleural effusion with adjacent opacity, likely atelectasis or pneumonia.",
    "Right lower lobe consolidation concerning for pneumonia. No pneumothorax is seen.",
    "Stable appearance of the chest. Sternotomy wires and surgical clips are present.",
    "Degenerative changes of the thoracic spine. No acute osseous abnormality.",
    "Endotracheal tube terminates above the carina. Nasogastric tube is in the stomach.",
    "Hyperinflated lungs consistent with emphysema. Calcified granuloma in the left apex.",
    "Findings: impression: frontal and lateral views of the chest were obtained.",
    "Write the radiology report for this chest X-ray.",
)


def build_tiny_tokenizer(vocab_texts: list[str] | None = None, pad_is_eos: bool = True,
                         vocab_size: int = 512):
    """Byte-level BPE trained in-process on the built-in corpus plus `vocab_texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS] + ([] if pad_is_eos else [PAD])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # The full byte alphabet means any text encodes without <unk>; training is deterministic.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = list(_CORPUS) + [text.lower() for text in _CORPUS] + list(vocab_texts or [])
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=EOS if pad_is_eos else PAD)


def build_tiny_llm(vocab_texts: list[str] | None = None, pad_is_eos: bool = True,
                   hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> FrozenLLM:
    """A tiny random LlamaForCausalLM + in-process tokenizer, frozen, deterministic per seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_texts, pad_is_eos=pad_is_eos)
    num_heads = 4 if hidden_size % 4 == 0 else 1
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # Fork the RNG so building the LLM never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return FrozenLLM(model, tokenizer)
