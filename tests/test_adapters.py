"""LoRA adapters on the frozen LLM: only adapters train, the base stays bit-identical."""
from __future__ import annotations

import mlflow
import pytest
import torch
from click.testing import CliRunner

from pipeline import config as C
from pipeline.models.llm import TrainableLLMError, prepare_adapters
from pipeline.models.tiny_lm import build_tiny_llm

TARGETS = ("q_proj", "v_proj")


def _ids(llm):
    return torch.tensor([llm.tokenizer("the heart is enlarged .", add_special_tokens=False)
                         ["input_ids"]])


def test_adapters_train_alone_and_leave_the_base_checksum_unchanged():
    llm = build_tiny_llm()
    pristine = llm.checksum()
    llm.add_adapters(4, 8, TARGETS)
    assert llm.checksum() == pristine  # `.base_layer` renaming is not a change
    names = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    llm.assert_frozen()
    ids = _ids(llm)
    with torch.no_grad():
        base_logits = llm.model(input_ids=ids).logits
    # Fresh adapters start as the identity (B = 0); a trained one changes the function.
    with torch.no_grad():
        assert torch.equal(llm.model(input_ids=ids).logits, base_logits)
        for name, param in llm.named_adapter_parameters():
            param.add_(0.1)
        trained = llm.model(input_ids=ids).logits
    assert not torch.allclose(trained, base_logits)
    assert llm.checksum() == pristine
    llm.use_adapters(False)  # switched off: the base LLM, bit for bit
    with torch.no_grad():
        assert torch.equal(llm.model(input_ids=ids).logits, base_logits)


def test_a_trainable_base_parameter_is_named_even_with_adapters():
    llm = build_tiny_llm()
    llm.add_adapters(2, 4, TARGETS)
    name, param = next((n, p) for n, p in llm.named_base_parameters() if "q_proj" in n)
    param.requires_grad_(True)
    with pytest.raises(TrainableLLMError, match="q_proj.base_layer.weight"):
        llm.assert_frozen()


def test_adapter_state_round_trips_and_refuses_a_misfit():
    from pipeline.models.llm import LLMLoadError

    llm = build_tiny_llm()
    cfg = C.LLMConfig(name="tiny-random", adapter_rank=2, adapter_alpha=4,
                      adapter_targets=TARGETS)
    prepare_adapters(llm, cfg)
    with torch.no_grad():
        for _, p in llm.named_adapter_parameters():
            p.normal_()
    saved = {k: v.clone() for k, v in llm.adapter_state().items()}
    other = build_tiny_llm()
    prepare_adapters(other, cfg, saved)
    assert all(torch.equal(other.adapter_state()[k], v) for k, v in saved.items())
    with pytest.raises(LLMLoadError, match="do not fit"):
        other.load_adapter_state(dict(list(saved.items())[:1]))
    with pytest.raises(LLMLoadError, match="holds LLM adapters"):
        prepare_adapters(build_tiny_llm(), C.LLMConfig(name="tiny-random"), saved)


def test_stage2_with_adapters_stops_before_step_1_on_a_trainable_base_parameter(
        mlflow_store, monkeypatch):
    from steps import stage2 as step

    def unfrozen(*args, **kwargs):
        llm = build_tiny_llm()
        # The recipe's own adapters are added on top; the base q_proj must stay frozen.
        llm.model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        return llm

    monkeypatch.setattr("pipeline.models.llm_loading.load_llm", unfrozen)
    assert C.build(C.Stage2Config, "tiny").llm.adapter_rank > 0
    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--init", "scratch"])
    assert result.exit_code != 0
    assert "layers.0.self_attn.q_proj" in result.output
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run_id = runs.iloc[0]["run_id"]
    assert not mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")


def test_stage2_with_adapters_records_the_base_checksum_and_serves_its_adapters(mlflow_store):
    from pipeline.checkpoint import STAGE2_FINAL, load_checkpoint
    from pipeline.models.loading import load_report_model
    from steps import stage2 as step

    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--init", "scratch"])
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    before, after = run["tags.llm.checksum_before"], run["tags.llm.checksum_after"]
    assert before and before == after == build_tiny_llm().checksum()
    assert run["metrics.llm_adapter_parameters"] > 0
    final = next(__import__("pathlib").Path("outputs/stage2", run["run_id"], "checkpoints")
                 .glob(f"{STAGE2_FINAL}*"))
    tensors, _ = load_checkpoint(final)
    adapters = {k: v for k, v in tensors.items() if k.startswith("llm_adapter.")}
    assert adapters and any(float(v.abs().sum()) > 0 for k, v in adapters.items()
                            if "lora_B" in k)  # trained: B moved away from its zero start
    model = load_report_model(final)
    loaded = model.llm.adapter_state()
    assert all(torch.equal(loaded[k.removeprefix("llm_adapter.")], v) for k, v in adapters.items())
    assert model.style is not None and model.style.sentences
