"""FrozenLLM and load_llm: freezing, guards, forward/generate, checksum, offline SmolLM2 cache."""
from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from pipeline.config import LLMConfig
from pipeline.models.llm import FrozenLLM, LLMLoadError, TrainableLLMError, left_align
from pipeline.models.llm_loading import load_llm
from pipeline.models.tiny_lm import build_tiny_llm

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tiny() -> FrozenLLM:
    return build_tiny_llm()


def _batch(llm: FrozenLLM, batch: int = 2, length: int = 6, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, length, llm.hidden_size, generator=generator)
    embeds.requires_grad_(requires_grad)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0  # right padding, as training batches have
    labels = torch.randint(0, len(llm.tokenizer), (batch, length), generator=generator)
    labels[:, :2] = -100  # e.g. visual-token positions
    labels[mask == 0] = -100
    return embeds, mask, labels


# --- tiny LM ----------------------------------------------------------------------------
def test_tiny_is_frozen_and_stays_in_eval(tiny):
    assert tiny.trainable_parameter_names() == []
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.training and not tiny.model.training
    parent = nn.ModuleDict({"llm": tiny, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not tiny.training and not any(m.training for m in tiny.modules())
    tiny.assert_frozen()


def test_assert_frozen_names_the_unfrozen_parameter():
    llm = build_tiny_llm()
    name, param = next(iter(llm.model.named_parameters()))
    param.requires_grad_(True)
    with pytest.raises(TrainableLLMError, match=name.replace(".", r"\.")) as info:
        llm.assert_frozen()
    assert "1 LLM parameter" in str(info.value)


def test_assert_frozen_caps_the_listed_names():
    llm = build_tiny_llm()
    llm.model.requires_grad_(True)  # what a careless parent.requires_grad_() would do
    count = len(list(llm.model.parameters()))
    with pytest.raises(TrainableLLMError, match=rf"{count} LLM parameter.*\.\.\.$"):
        llm.assert_frozen()


def test_forward_loss_is_finite_and_grad_reaches_only_the_inputs(tiny):
    embeds, mask, labels = _batch(tiny, requires_grad=True)
    out = tiny(embeds, mask, labels=labels)
    assert out.logits.shape == (2, 6, len(tiny.tokenizer))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(tiny):
    embeds, mask, labels = _batch(tiny)
    out = tiny(embeds, mask, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_forward_rejects_mismatched_shapes(tiny):
    embeds, mask, labels = _batch(tiny)
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny(embeds[..., :-1], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        tiny(embeds, mask[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        tiny(embeds, mask, labels=labels[:, :-1])


def test_embed_and_embedding_table(tiny):
    ids = tiny.tokenizer("The lungs are clear.", return_tensors="pt").input_ids
    embeds = tiny.embed(ids)
    assert embeds.shape == (1, ids.shape[1], tiny.hidden_size)
    table = tiny.embedding_table()
    assert table.shape == (len(tiny.tokenizer), tiny.hidden_size) and not table.requires_grad
    torch.testing.assert_close(embeds[0], table[ids[0]])


def test_generate_returns_strings_greedy_and_beam(tiny):
    embeds, mask, _ = _batch(tiny)
    greedy = tiny.generate(embeds, mask, max_new_tokens=5)
    assert len(greedy) == 2 and all(isinstance(text, str) for text in greedy)
    assert greedy == tiny.generate(embeds, mask, max_new_tokens=5)
    beams = tiny.generate(embeds, mask, max_new_tokens=5, num_beams=3)
    assert len(beams) == 2 and all(isinstance(text, str) for text in beams)


def test_generate_right_padding_matches_unpadded(tiny):
    embeds, mask, _ = _batch(tiny)  # row 1 is right-padded by 2
    batched = tiny.generate(embeds, mask, max_new_tokens=5)
    alone = tiny.generate(embeds[1:, :-2], mask[1:, :-2], max_new_tokens=5)
    assert batched[1] == alone[0]


def test_left_align_moves_padding_left_and_rejects_holes():
    embeds = torch.arange(8.0).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    aligned, new_mask = left_align(embeds, mask)
    assert new_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert aligned[0, 2:, 0].tolist() == [0.0, 1.0] and aligned[1, 1:, 0].tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="holes"):
        left_align(embeds, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="empty"):
        left_align(embeds, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_decode_cuts_at_first_eos(tiny):
    ids = tiny.tokenizer("The lungs are clear.").input_ids
    eos, pad = tiny.eos_token_id, tiny.pad_token_id
    rows = [ids + [eos, pad, pad], ids[:2] + [eos] * (len(ids) + 1)]
    texts = tiny.decode_new_tokens(torch.tensor(rows))
    assert texts[0] == "The lungs are clear."
    assert texts[1] == tiny.tokenizer.decode(ids[:2])


def test_checksum_is_stable_and_sees_one_changed_weight():
    llm = build_tiny_llm()
    first = llm.checksum()
    assert first == llm.checksum() == build_tiny_llm().checksum()
    assert first != build_tiny_llm(seed=1).checksum()
    with torch.no_grad():
        llm.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
    assert llm.checksum() != first


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_pad_token_variants(pad_is_eos):
    llm = build_tiny_llm(pad_is_eos=pad_is_eos)
    assert llm.pad_is_eos is pad_is_eos
    assert (llm.pad_token_id == llm.eos_token_id) is pad_is_eos
    assert llm.tokenizer.bos_token_id not in (llm.eos_token_id, llm.pad_token_id)
    embeds, mask, labels = _batch(llm)
    assert torch.isfinite(llm(embeds, mask, labels=labels).loss)
    assert len(llm.generate(embeds, mask, max_new_tokens=3)) == 2


def test_tiny_tokenizer_round_trips_unseen_text_and_learns_vocab_texts():
    text = "Ünïcode 42% — pneumomediastinum"
    llm = build_tiny_llm(vocab_texts=["pneumomediastinum"] * 3)
    ids = llm.tokenizer(text).input_ids
    assert llm.tokenizer.unk_token_id not in ids
    assert llm.tokenizer.decode(ids) == text
    assert len(llm.tokenizer("pneumomediastinum").input_ids) == 1


def test_tiny_build_is_fast_and_leaves_the_global_rng_alone():
    build_tiny_llm()  # warm the imports
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    start = time.perf_counter()
    build_tiny_llm(seed=7)
    elapsed = time.perf_counter() - start
    assert torch.equal(torch.rand(3), expected)
    assert elapsed < 0.5, f"building the tiny LLM took {elapsed:.2f} s"


def test_load_llm_tiny_random_and_dtype():
    assert load_llm("tiny-random").checksum() == build_tiny_llm().checksum()
    llm = load_llm("tiny-random", dtype="bfloat16")
    assert llm.dtype == torch.bfloat16
    embeds, mask, labels = _batch(llm)  # fp32 inputs are cast to the LLM's dtype
    assert torch.isfinite(llm(embeds, mask, labels=labels).loss.float())
    assert len(llm.checksum()) == 64


def test_load_llm_local_folder_round_trip(tmp_path):
    llm = build_tiny_llm()
    llm.model.save_pretrained(tmp_path)
    llm.tokenizer.save_pretrained(tmp_path)
    loaded = load_llm(str(tmp_path))
    assert loaded.checksum() == llm.checksum()
    loaded.assert_frozen()


def test_load_llm_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMLoadError, match="smollm2"):
        load_llm("nobody-xyz/not-a-cached-model-123", cache_dir=tmp_path)
    with pytest.raises(LLMLoadError, match="not found"):
        load_llm(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    with pytest.raises(LLMLoadError, match="config.json"):
        load_llm(str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(LLMLoadError, match="dtype"):
        load_llm("tiny-random", dtype="float8")


# --- the real offline SmolLM2 -----------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """Converts the GGUF once per session into a temp cache and times the cold load."""
    cache = tmp_path_factory.mktemp("llm_cache")
    start = time.perf_counter()
    llm = load_llm(LLMConfig().name, cache_dir=cache)
    return cache, llm, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2_cache):
    _, llm, _ = smollm2_cache
    assert llm.hidden_size == 576 and llm.pad_is_eos
    llm.assert_frozen()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer(text, return_tensors="pt").input_ids
    embeds = llm.embed(ids)
    mask = torch.ones_like(ids)
    greedy = llm.generate(embeds, mask, max_new_tokens=16)
    beam = llm.generate(embeds, mask, max_new_tokens=16, num_beams=2)
    logger.info("greedy %r, beam %r", greedy, beam)
    assert "Paris" in greedy[0] and "Paris" in beam[0]
    assert "<|im_end|>" not in greedy[0]


@pytest.mark.slow
def test_smollm2_second_load_is_fast_and_identical(smollm2_cache):
    cache, llm, cold = smollm2_cache
    entries = [p.name for p in cache.iterdir()]
    assert len(entries) == 1 and not entries[0].startswith("."), entries  # no temp dir left
    start = time.perf_counter()
    again = load_llm("smollm2", cache_dir=cache)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    digest = again.checksum()
    hashing = time.perf_counter() - start
    print(f"\nsmollm2 load: first (convert) {cold:.1f} s, cached {warm:.1f} s; "
          f"checksum of {sum(p.numel() for p in again.parameters()):,} params {hashing:.2f} s")
    assert warm < 15
    assert digest == llm.checksum()


@pytest.mark.slow
def test_smollm2_assert_frozen_raises_when_unfrozen(smollm2_cache):
    _, llm, _ = smollm2_cache
    name, param = list(llm.model.named_parameters())[-1]
    param.requires_grad_(True)
    try:
        with pytest.raises(TrainableLLMError, match=name.replace(".", r"\.")):
            llm.assert_frozen()
    finally:
        param.requires_grad_(False)  # a test, not pipeline code: restore the shared fixture
    llm.assert_frozen()
