"""The base LLM a Stage 2 model was trained against travels with it: its checksum is in the
checkpoint and on the registered version, and evaluation and serving refuse other weights
behind the same name, naming both checksums."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import read_metadata
from pipeline.models import llm_loading
from pipeline.models.loading import BaseLLMMismatch, load_report_model


def _other_base_weights(*args, **kwargs):
    """What `tiny-random` resolves to on a machine where the LLM is not the same."""
    llm = llm_loading.build_tiny_llm()
    with torch.no_grad():
        next(p for _, p in llm.named_base_parameters()).add_(0.01)
    return llm


def test_the_base_checksum_is_recorded_and_another_base_is_refused_at_load(mlflow_store,
                                                                           monkeypatch):
    from steps import evaluate, stage2

    result = CliRunner().invoke(stage2.main, ["--profile", "tiny", "--epochs", "1",
                                              "--init", "scratch"])
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`pipeline.stage` = 'stage2'")
    trained = run.data.tags["llm.checksum_before"]
    final = Path("outputs/stage2") / run.info.run_id / "checkpoints" / \
        "vision_bridge_vlm_final.safetensors"
    assert read_metadata(final)["llm_checksum"] == trained
    version = MlflowClient().get_model_version_by_alias("report-vlm", "candidate")
    assert version.tags["llm_checksum"] == trained
    assert load_report_model(final) is not None  # the same base: loads

    monkeypatch.setattr(llm_loading, "load_llm", _other_base_weights)
    with pytest.raises(BaseLLMMismatch) as refused:
        load_report_model(final)
    found = _other_base_weights().checksum()
    assert trained in str(refused.value) and found in str(refused.value)

    with pytest.raises(Exception, match=trained):  # serving: the pyfunc refuses at load
        mlflow.pyfunc.load_model("models:/report-vlm@candidate")

    evaluated = CliRunner().invoke(evaluate.main, ["--model", run.info.run_id, "--profile",
                                                   "tiny", "--no-meteor"])
    assert evaluated.exit_code != 0
    assert trained in evaluated.output + str(evaluated.exception), evaluated.output
