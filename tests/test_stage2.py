"""Stage 2 guards, layout and resume on the tiny profile with a tiny random LM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pipeline.models import captioning
from pipeline import config as C
from pipeline.guards import IGNORE_INDEX, GuardError, check_label_mask
from pipeline.models.llm import TrainableLLMError
from pipeline.models.tiny_lm import build_tiny_llm
from tests.processes import wait_for_csv_rows

ROOT = Path(__file__).resolve().parents[1]


def _layout(llm, reports=("heart is enlarged .", "no effusion")):
    return captioning.tokenize_batch(llm.tokenizer, "Report:", list(reports), llm.eos_token_id,
                                     llm.pad_token_id, n_visual=4, max_report_tokens=32)


def test_labels_supervise_exactly_report_and_eos_with_pad_equal_eos():
    llm = build_tiny_llm(pad_is_eos=True)
    assert llm.pad_token_id == llm.eos_token_id
    layout = _layout(llm)
    labels = captioning.make_labels(layout)
    mask = captioning.report_positions(layout)
    assert check_label_mask(labels, mask) == sum(len(r) for r in layout.report_ids)
    for i, report in enumerate(layout.report_ids):
        start = 4 + len(layout.prompt_ids[i])  # prompts are per sample
        end = start + len(report)
        assert labels[i, end - 1] == llm.eos_token_id  # EOS supervised although pad == EOS
        assert (labels[i, :start] == IGNORE_INDEX).all() and (labels[i, end:] == IGNORE_INDEX).all()
    # The shorter sample is right-padded with the pad (= EOS) id, and those are not supervised.
    ids, attn = captioning.text_ids(layout)
    short = min(range(2), key=lambda i: len(layout.report_ids[i]))
    assert (ids[short][attn[short] == 0] == llm.eos_token_id).all()


def test_per_sample_prompts_of_different_lengths_keep_the_mask_exact():
    llm = build_tiny_llm(pad_is_eos=True)
    layout = captioning.tokenize_batch(
        llm.tokenizer, ["Findings: none.\nReport:", "Findings: cardiomegaly; left pleural "
                        "effusion.\nReport:"], ["heart is enlarged .", "no effusion"],
        llm.eos_token_id, llm.pad_token_id, n_visual=4, max_report_tokens=32)
    assert len(layout.prompt_ids[0]) < len(layout.prompt_ids[1])
    labels = captioning.make_labels(layout)
    assert check_label_mask(labels, captioning.report_positions(layout)) == \
        sum(len(r) for r in layout.report_ids)
    for i, (prompt, report) in enumerate(zip(layout.prompt_ids, layout.report_ids)):
        start = 4 + len(prompt)
        assert labels[i, start:start + len(report)].tolist() == list(report)
        assert (labels[i, :start] == IGNORE_INDEX).all()


def _supervise_prompt(layout):
    labels = captioning.make_labels(layout)
    labels[:, layout.n_visual] = 7  # the first prompt position
    return labels


def _supervise_padding(layout):
    labels = captioning.make_labels(layout)
    labels[:, -1] = layout.pad_id
    return labels


@pytest.mark.parametrize("broken", [_supervise_prompt, _supervise_padding])
def test_broken_masking_is_caught_before_the_first_step(broken, tmp_path):
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.stage2.trainer import Stage2Trainer
    from pipeline.train.common import EpochLoaders
    from pipeline.data import load_dataset

    cfg = C.build(C.Stage2Config, "tiny", {"data.root": str(tmp_path / "data")})
    llm = build_tiny_llm()
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size)
    records = load_dataset(cfg.data)
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size, 2, 0)
    trainer = Stage2Trainer(cfg, model, llm, loaders, tmp_path, "run", lambda m, s: None,
                            lambda t: None, __import__("logging").getLogger("t"), label_fn=broken)
    with pytest.raises(GuardError, match="label masking broken"):
        trainer.preflight()
    assert trainer.state.step == 0


def test_unfrozen_llm_parameter_makes_the_step_exit_nonzero_naming_it(mlflow_store, monkeypatch):
    from steps import stage2 as step

    def unfrozen(*args, **kwargs):
        llm = build_tiny_llm()
        llm.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        return llm

    monkeypatch.setattr("pipeline.models.llm_loading.load_llm", unfrozen)
    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--init", "scratch"])
    assert result.exit_code != 0
    assert "layers.0.mlp.up_proj.weight" in result.output
    assert isinstance(result.exception, SystemExit)


def test_assert_frozen_error_type_names_the_parameter():
    llm = build_tiny_llm()
    name, param = next(iter(llm.named_parameters()))
    param.requires_grad_(True)
    with pytest.raises(TrainableLLMError, match=name.split(".")[-1]):
        llm.assert_frozen()


def _stage2(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "steps.stage2", "--profile", "tiny", *args],
                            cwd=kw.get("cwd"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _started(mlflow_store, tmp_path):
    """A 3-epoch tiny Stage 2 from scratch, started: (process, env, args, csv finder)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_store}
    args = ["--init", "scratch", "--epochs", "3", "--llm", "tiny-random",
            "--output_dir", str(tmp_path / "out")]
    csv_glob = lambda: list((tmp_path / "out").glob("*/stage2_train_log.csv"))  # noqa: E731
    return _stage2(args, env, cwd=tmp_path), env, args, csv_glob


def test_kill9_mid_epoch_then_resume_has_every_step_once(mlflow_store, tmp_path):
    import mlflow

    proc, env, args, csv_glob = _started(mlflow_store, tmp_path)
    # Tiny profile: 12 train samples, batch 2 -> 6 steps/epoch; checkpoint every 4 steps.
    # Kill in the middle of epoch 2 (step 9), after the step-8 checkpoint.
    wait_for_csv_rows(tmp_path / "out", "*/stage2_train_log.csv", 9, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = pd.read_csv(csv_glob()[0])
    assert 9 <= len(done) < 18
    run_id = csv_glob()[0].parent.name
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so

    resumed = subprocess.run([sys.executable, "-m", "steps.stage2", "--profile", "tiny", *args[2:],
                              "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    frame = pd.read_csv(csv_glob()[0])
    assert frame["step"].tolist() == list(range(1, 19))
    assert frame["epoch"].max() == 3
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 19)), steps
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["llm.checksum_before"] == run.data.tags["llm.checksum_after"]
    epochs = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_loss")]
    assert sorted(epochs) == [1, 2, 3]


def _stage1_checkpoint(tmp_path, collapse: bool):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage1Config, "tiny")
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    state = model.state_dict()
    if collapse:  # dead features: the projector outputs zeros for every image
        state = {k: torch.zeros_like(v) if k.startswith("bridge.proj.2") else v
                 for k, v in state.items()}
    return save_checkpoint(tmp_path / ("dead" if collapse else "live"), state,
                           {"stage": "stage1", "config": C.to_dict(cfg)})


@pytest.mark.parametrize("collapse", [True, False])
def test_collapsed_stage1_checkpoint_is_refused_as_init(mlflow_store, tmp_path, collapse):
    from steps import stage2 as step

    path = _stage1_checkpoint(tmp_path, collapse)
    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--vision_checkpoint", str(path),
                                            "--epochs", "1"])
    if collapse:
        assert result.exit_code == 2, result.output
        assert "refusing to initialise Stage 2" in result.output
        assert "feature_std" in result.output
        assert not list((tmp_path / "outputs").glob("stage2/*/checkpoints/*"))
        forced = CliRunner().invoke(step.main, ["--profile", "tiny", "--vision_checkpoint",
                                                str(path), "--epochs", "1", "--force_init"])
        assert forced.exit_code == 0, forced.output
    else:
        assert result.exit_code == 0, result.output
        run = mlflow_run_of("stage2")
        assert run.data.tags["init.source"] == "checkpoint"


def mlflow_run_of(stage):
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`pipeline.stage` = '{stage}'")[0]


def test_latest_init_continues_from_the_previous_stage2_final(mlflow_store):
    from steps import stage2 as step

    first = CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "1"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "1",
                                            "--init", "latest"])
    assert second.exit_code == 0, second.output
    assert "init: previous-stage2" in second.output
    assert mlflow_run_of("stage2").data.tags["init.source"] == "previous-stage2"


def test_nonsense_epochs_are_refused_in_one_line(mlflow_store):
    from steps import stage2 as step

    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "0"])
    assert result.exit_code == 2 and "epochs=0 (must be >= 1)" in result.output


def test_stage1_of_another_width_is_refused_before_training_naming_both(mlflow_store, tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.vision_bridge import VisionBridge
    from steps import stage2 as step

    cfg = C.build(C.Stage1Config, "tiny", {"embed_dim": 48})  # the tiny LLM is 64 wide
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    path = save_checkpoint(tmp_path / "narrow", model.state_dict(),
                           {"stage": "stage1", "config": C.to_dict(cfg)})
    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--init", str(path),
                                            "--epochs", "1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "48" in errors[0] and "64" in errors[0], result.output
    assert "Traceback" not in result.output
    assert not mlflow_run_of_any("stage2")


def mlflow_run_of_any(stage):
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`pipeline.stage` = '{stage}'")


def _stage2_cli(*args):
    from steps import stage2 as step

    return CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "1", *args])


def test_auto_init_resumes_an_interrupted_run_with_the_same_config(mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    run = mlflow_run_of("stage2")
    folder = Path("outputs/stage2") / run.info.run_id
    (folder / "checkpoints" / "vision_bridge_vlm_final.safetensors").unlink()  # as if killed
    assert list((folder / "checkpoints").glob("vision_bridge_vlm_step*"))
    second = _stage2_cli()  # init=auto; the saved config comes back from JSON (lists)
    assert second.exit_code == 0, second.output
    assert "config differs" not in second.output
    assert "init: resume" in second.output, second.output


def test_resume_of_a_folder_without_step_checkpoint_is_one_error_line(mlflow_store, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _stage2_cli("--resume", str(tmp_path / "empty"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no step checkpoint" in errors[0], result.output


def test_latest_init_skips_the_final_checkpoint_of_a_failed_run(mlflow_store):
    import mlflow

    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    failed = mlflow_run_of("stage2").info.run_id
    mlflow.tracking.MlflowClient().set_terminated(failed, "FAILED")  # e.g. the checksum check
    second = _stage2_cli("--init", "latest")
    assert second.exit_code == 0, second.output
    assert "init: scratch" in second.output and f"run {failed}: its run is FAILED" \
        in second.output, second.output


def test_latest_init_takes_only_weights_of_the_requested_architecture(mlflow_store, tmp_path):
    import json

    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    earlier = mlflow_run_of("stage2").info.run_id
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({"encoder": {"depth": 2}}))
    second = _stage2_cli("--config", str(deeper), "--init", "latest")
    assert second.exit_code == 0, second.output
    assert "init: scratch" in second.output and f"run {earlier}: its encoder differ" \
        in second.output, second.output
    run = mlflow_run_of("stage2")
    assert run.data.params["encoder.depth"] == "2"  # trained what the run says it trained
    third = _stage2_cli("--init", "latest")  # the first's architecture: taken, by name
    assert third.exit_code == 0, third.output
    assert "init: previous-stage2" in third.output and earlier in third.output


def _final_adapters(run_id: str) -> dict:
    from pipeline.checkpoint import load_checkpoint, split_prefix
    from pipeline.models.llm import ADAPTER_PREFIX

    path = Path("outputs/stage2") / run_id / "checkpoints" / "vision_bridge_vlm_final.safetensors"
    return split_prefix(load_checkpoint(path)[0], ADAPTER_PREFIX)


def test_latest_init_continues_the_llm_adapters_too(mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    earlier = _final_adapters(mlflow_run_of("stage2").info.run_id)
    assert earlier and any(v.abs().sum() > 0 for k, v in earlier.items() if "lora_B" in k)
    # The adapters do not move (lr 0): the second run ends where it started.
    second = _stage2_cli("--init", "latest", "--adapter_lr", "0")
    assert second.exit_code == 0, second.output
    assert "init: previous-stage2" in second.output
    later = _final_adapters(mlflow_run_of("stage2").info.run_id)
    assert later.keys() == earlier.keys()
    fresh = [k for k in later if not torch.equal(later[k], earlier[k])]
    assert not fresh, f"continued from fresh adapters, not the earlier run's: {fresh[:3]}"


def test_latest_init_passes_over_a_run_with_other_adapters_and_says_why(mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    earlier = mlflow_run_of("stage2").info.run_id
    second = _stage2_cli("--init", "latest", "--adapter_rank", "4")
    assert second.exit_code == 0, second.output
    assert "init: scratch" in second.output and f"run {earlier}: its adapters differ" \
        in second.output, second.output


def test_an_explicit_stage2_checkpoint_with_other_adapters_is_refused_with_the_reason(
        mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    final = Path("outputs/stage2") / mlflow_run_of("stage2").info.run_id / "checkpoints" / \
        "vision_bridge_vlm_final.safetensors"
    second = _stage2_cli("--init", str(final), "--adapter_rank", "4")
    assert second.exit_code != 0
    assert "holds LLM adapters (rank 2 vs 4)" in second.output, second.output


def test_sigterm_saves_a_checkpoint_at_the_step_it_stopped_and_metrics_stop_there(
        mlflow_store, tmp_path):
    """SIGTERM mid-epoch: exit 130, a step checkpoint saved on interrupt that covers exactly the
    steps MLflow holds (the flush after it sends none past it), and a resume re-logs none."""
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import read_metadata
    from pipeline.stage2.resume import latest_step_checkpoint

    proc, env, args, csv_glob = _started(mlflow_store, tmp_path)
    deadline = time.time() + 120
    while not (csv_glob() and len(pd.read_csv(csv_glob()[0])) >= 6):  # past the step-4 save
        assert proc.poll() is None, "stage2 ended before it could be stopped:\n" + proc.stdout.read()
        assert time.time() < deadline, "stage2 too slow to reach step 6"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    folder = csv_glob()[0].parent
    ckpt = latest_step_checkpoint(folder)
    meta = read_metadata(ckpt)
    rows = len(pd.read_csv(csv_glob()[0]))
    assert meta["interrupted"] is True and meta["step"] == rows >= 6, (ckpt.name, rows)
    client = MlflowClient(mlflow_store)
    logged = sorted(m.step for m in client.get_metric_history(folder.name, "train_loss"))
    assert logged == list(range(1, rows + 1))  # nothing past the checkpoint, nothing twice
    assert client.get_run(folder.name).info.status == "KILLED"

    resumed = subprocess.run([sys.executable, "-m", "steps.stage2", "--profile", "tiny",
                              *args[2:], "--resume", str(folder)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run = client.get_run(folder.name)
    steps = sorted(m.step for m in client.get_metric_history(folder.name, "train_loss"))
    assert steps == list(range(1, 19)), steps
    assert run.data.tags["init.source"] == "scratch" and "resumed_from" in run.data.tags
    assert run.data.metrics["final_train_loss"] == pytest.approx(
        pd.read_csv(csv_glob()[0]).query("epoch == 3")["caption_loss"].mean(), abs=1e-5)


def test_stage1_from_before_cells_initialises_stage2_with_its_mean_head(mlflow_store, tmp_path):
    # Its saved config names no finding grid (the default is now 4 cells); its weights say 1.
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.vision_bridge import VisionBridge
    from steps import stage2 as step

    cfg = C.build(C.Stage1Config, "tiny", {"bridge.finding_grid": 1})
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    saved = C.to_dict(cfg)
    del saved["bridge"]["finding_grid"]
    path = save_checkpoint(tmp_path / "old", model.state_dict(),
                           {"stage": "stage1", "config": saved})
    result = CliRunner().invoke(step.main, ["--profile", "tiny", "--init", str(path),
                                            "--epochs", "1", "--force_init"])
    assert result.exit_code == 0, result.output
    run = mlflow_run_of("stage2")
    assert run.data.tags["init.source"] == "checkpoint"
    final = next((tmp_path / "outputs").glob("stage2/*/checkpoints/vision_bridge_vlm_final*"))
    from pipeline.models.loading import weights_of

    tensors, _ = weights_of(final)
    assert tensors["finding_head.linear.weight"].shape[1] == cfg.encoder.d_model


def test_the_head_stage2_trains_records_stage2s_training_weights_as_its_prior(mlflow_store):
    import mlflow

    from pipeline.data import load_dataset
    from pipeline.models.findings import FINE, positive_weights
    from pipeline.models.loading import PRIOR_KEY, weights_of

    cfg = C.build(C.Stage2Config, "tiny")
    assert cfg.findings and cfg.aux_finding_weight > 0
    result = _stage2_cli("--init", "scratch")
    assert result.exit_code == 0, result.output
    final = mlflow.artifacts.download_artifacts(
        run_id=mlflow_run_of("stage2").info.run_id,
        artifact_path="checkpoints/vision_bridge_vlm_final.safetensors")
    train = load_dataset(cfg.data)["train"]
    expected = torch.log(positive_weights([r.report for r in train])[:len(FINE)])
    assert torch.allclose(weights_of(Path(final))[0][PRIOR_KEY], expected)
