"""Behaviour that must hold at the edges: reproducible choices, honest labels, masked secrets,
initialisation and reuse that never mix unrelated runs, errors that say what happened."""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pipeline import config as C

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- sampled candidates
def test_an_image_gets_the_same_candidates_alone_or_anywhere_in_a_batch(grounded_llm):
    from pipeline.models.llm_loading import load_llm
    from pipeline.models.report_model import generate_candidates
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage2Config, "tiny")
    llm = load_llm(str(grounded_llm))
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, llm.hidden_size)
    images = torch.randn(3, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    kwargs = dict(num_beams=2, findings=True, samples=3, seed=5)
    alone, _ = generate_candidates(model, llm, images[1:2], cfg.prompt, 6, **kwargs)
    second, _ = generate_candidates(model, llm, images, cfg.prompt, 6, **kwargs)
    last, _ = generate_candidates(model, llm, images[[2, 0, 1]], cfg.prompt, 6, batch_size=2,
                                  **kwargs)
    assert second[1][2:] == alone[0][2:]
    assert last[2][2:] == alone[0][2:]


# ----------------------------------------------------------------- unlocalised findings
@pytest.mark.parametrize("report, group", [
    ("There is a pleural effusion.", "effusion"),
    ("A pneumothorax is present.", "pneumothorax"),
    ("There is a pulmonary nodule.", "nodule"),
    ("Consolidation in the left lung.", "consolidation"),  # a side, no zone
])
def test_an_affirmed_finding_without_a_place_is_a_positive_fine_label(report, group):
    from pipeline.data.labeler import coarse_labels, label_report

    fine = label_report(report)
    assert fine["no_finding"] == 0, fine
    assert any(v for k, v in fine.items() if k.startswith(group)), fine
    assert coarse_labels(report)[group] == 1


def test_localised_and_negated_findings_read_as_before():
    from pipeline.data.labeler import label_report

    fine = label_report("Small left pleural effusion.")
    assert {k for k, v in fine.items() if v} == {"effusion_left"}
    assert {k for k, v in label_report("No pleural effusion.").items() if v} == {"no_finding"}


# ----------------------------------------------------------------- masked credentials
def test_main_prints_no_password_of_the_tracking_uri(monkeypatch, capsys):
    import mlflow

    from steps import main as step

    monkeypatch.setattr(mlflow, "get_tracking_uri",
                        lambda: "https://user:secret@mlflow.example.org")
    monkeypatch.setattr(step, "run_metrics", lambda run_id: {"score": 0.5})
    monkeypatch.setattr(step, "run_tags", lambda run_id: {})
    monkeypatch.setattr(step, "artifact_uri",
                        lambda run_id: f"https://user:secret@mlflow.example.org/a/{run_id}")
    monkeypatch.setattr(step, "log_metrics", lambda metrics: None)
    step._summary("p", "s1", "s2", "ev")
    out = capsys.readouterr()
    assert "secret" not in out.out + out.err, out.out
    assert "see them: open https://user:***@mlflow.example.org" in out.out


# ----------------------------------------------------------------- init and resume
def _stage2_cli(*args):
    from steps import stage2 as step

    return CliRunner().invoke(step.main, ["--profile", "tiny", "--epochs", "1", *args])


def _stage2_runs():
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`pipeline.stage` = 'stage2'",
                              order_by=["attributes.start_time DESC"])


def _unrelated_interrupted_run(world_size: int) -> Path:
    """A newer interrupted Stage 2 folder of another config (another lr), `world_size` ranks."""
    from pipeline.checkpoint import save_checkpoint

    cfg = C.build(C.Stage2Config, "tiny", {"lr": 0.5})
    folder = Path(cfg.output_dir) / "unrelated"
    save_checkpoint(folder / "checkpoints" / "vision_bridge_vlm_step3",
                    {"w": torch.zeros(1)},
                    {"stage": "stage2", "run_id": "unrelated", "config": C.to_dict(cfg),
                     "resume": {"world_size": world_size, "step": 3}})
    return folder


def test_auto_init_is_not_refused_by_an_unrelated_interrupted_run(mlflow_store):
    _unrelated_interrupted_run(world_size=2)
    result = _stage2_cli()
    assert result.exit_code == 0, result.output
    assert "init: scratch" in result.output, result.output


def test_auto_init_resumes_the_interrupted_run_of_the_same_config_not_the_newest(mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    run_id = _stage2_runs()[0].info.run_id
    folder = Path("outputs/stage2") / run_id
    (folder / "checkpoints" / "vision_bridge_vlm_final.safetensors").unlink()  # as if killed
    unrelated = _unrelated_interrupted_run(world_size=1)
    later = max(p.stat().st_mtime for p in folder.rglob("*")) + 10
    for path in unrelated.rglob("*"):
        os.utime(path, (later, later))
    second = _stage2_cli()
    assert second.exit_code == 0, second.output
    init_lines = [line for line in second.output.splitlines() if line.startswith("init:")]
    assert len(init_lines) == 1 and init_lines[0].startswith("init: resume") \
        and run_id in init_lines[0], second.output
    assert len(_stage2_runs()) == 1  # continued in the same run


def test_auto_init_never_chains_finished_stage2_runs_latest_does(mlflow_store):
    first = _stage2_cli("--init", "scratch")
    assert first.exit_code == 0, first.output
    earlier = _stage2_runs()[0].info.run_id
    second = _stage2_cli("--lr", "5e-3")  # a sweep point: must not start from the first
    assert second.exit_code == 0, second.output
    assert "init: previous-stage2" not in second.output, second.output
    assert "init: scratch" in second.output  # no stage2-ready Stage 1 in this store
    third = _stage2_cli("--init", "latest")
    assert third.exit_code == 0, third.output
    assert "init: previous-stage2" in third.output, third.output
    assert _stage2_runs()[0].data.tags["init.source"] == "previous-stage2"
    assert earlier in third.output or _stage2_runs()[1].info.run_id in third.output


# ----------------------------------------------------------------- main's reuse key
def _fake_main_children(monkeypatch, step, ran: list):
    import mlflow

    def run_entry_point(name, params):
        client = mlflow.tracking.MlflowClient()
        experiment = mlflow.get_experiment_by_name("radiology-report-vlm").experiment_id
        run = client.create_run(experiment, tags={"mlflow.project.entryPoint": name})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
        ran.append(name)
        return run.info.run_id

    monkeypatch.setattr(step, "run_entry_point", run_entry_point)
    monkeypatch.setattr(step, "run_verdict", lambda run_id: "approved")
    monkeypatch.setattr(step, "vision_version_of_run", lambda run_id: "1")
    monkeypatch.setattr(step, "_summary", lambda *ids: None)


def test_main_reruns_steps_when_the_data_content_changed(mlflow_store, monkeypatch):
    from steps import main as step

    ran: list = []
    _fake_main_children(monkeypatch, step, ran)
    first = CliRunner().invoke(step.main, ["--profile", "tiny"])
    assert first.exit_code == 0, first.output
    assert ran == ["stage1", "validate", "stage2", "evaluate"]
    image = next(Path("data").glob("synthetic_*/images/*/0.png"))
    from PIL import Image

    Image.new("L", (32, 32), 7).save(image)  # same names and reports, other pixels
    ran.clear()
    second = CliRunner().invoke(step.main, ["--profile", "tiny"])
    assert second.exit_code == 0, second.output
    assert ran == ["stage1", "validate", "stage2", "evaluate"], second.output


def test_main_reruns_steps_when_the_source_tree_changed_without_git(mlflow_store, monkeypatch):
    from steps import main as step

    ran: list = []
    _fake_main_children(monkeypatch, step, ran)
    assert CliRunner().invoke(step.main, ["--profile", "tiny"]).exit_code == 0
    ran.clear()
    again = CliRunner().invoke(step.main, ["--profile", "tiny"])
    assert again.exit_code == 0 and ran == [], again.output  # same code and data: reused
    monkeypatch.setattr(step, "source_digest", lambda: "an edited tree", raising=False)
    edited = CliRunner().invoke(step.main, ["--profile", "tiny"])
    assert edited.exit_code == 0, edited.output
    assert ran == ["stage1", "validate", "stage2", "evaluate"], edited.output


def test_source_digest_follows_the_content_of_the_python_files(tmp_path):
    from pipeline.tracking.runs import source_digest

    for name in ("pipeline", "steps"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "steps" / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == before
    (tmp_path / "pipeline" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != before


# ----------------------------------------------------------------- errors
def test_an_unexpected_value_error_keeps_its_traceback():
    from steps.common import one_line_errors

    @one_line_errors
    def buggy():
        raise ValueError("an internal bug")

    with pytest.raises(ValueError, match="an internal bug"):
        buggy()


def test_bad_input_is_still_one_line_and_non_zero(mlflow_store):
    from steps import validate as step

    result = CliRunner().invoke(step.main, ["--profile", "tiny"])  # no Stage 1 run yet
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no finished Stage 1 run" in errors[0], result.output


def test_a_tracking_outage_at_end_run_does_not_hide_the_real_error(mlflow_store, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.runs import stage_run

    real_end = mlflow.end_run

    def end_run(status="FINISHED"):
        if status == "FAILED":
            raise MlflowException("API request failed: connection refused")
        return real_end(status)

    monkeypatch.setattr(mlflow, "end_run", end_run)
    with pytest.raises(RuntimeError, match="the real error"):
        with stage_run("stage2"):
            raise RuntimeError("the real error")


def test_evaluate_logs_the_data_it_actually_used(mlflow_store, monkeypatch):
    import mlflow
    import pandas as pd

    from steps import evaluate as step

    used = "/data/iu_xray/annotation.json"  # the model's own training data
    monkeypatch.setattr(step, "resolve_stage2_checkpoint", lambda ref: ("ckpt", None))
    monkeypatch.setattr(step, "evaluate_model", lambda checkpoint, **kw: SimpleNamespace(
        metrics={}, table=pd.DataFrame({"id": []}), figure=None, score_definition="s",
        decoding="greedy", blind_report="", data_digest="d", data_source=used))
    result = CliRunner().invoke(step.main, ["--model", "m", "--split", "val"])
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.params["data"] == used


def test_the_blind_baseline_keeps_the_shorter_of_equal_reports():
    from pipeline.evaluate.evaluation import best_constant_report

    reports = ["The heart is enlarged and the lungs are otherwise clear today.", "Cardiomegaly."]
    assert best_constant_report(reports) == "Cardiomegaly."
    assert best_constant_report(reports[::-1]) == "Cardiomegaly."


# ----------------------------------------------------------------- smaller ones
def test_an_interrupted_synthetic_generation_leaves_nothing_in_place(tmp_path, monkeypatch):
    from pipeline.data import synthetic

    calls = []

    def failing_draw(study, size, rng):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_draw(study, size, rng)

    real_draw = synthetic.draw_study
    monkeypatch.setattr(synthetic, "draw_study", failing_draw)
    with pytest.raises(OSError):
        synthetic.generate_synthetic(tmp_path / "set", n_train=4, n_val=1, n_test=1,
                                     image_size=32)
    assert not (tmp_path / "set").exists()
    assert os.listdir(tmp_path) == []  # no temporary folder left either
    monkeypatch.setattr(synthetic, "draw_study", real_draw)
    path = synthetic.generate_synthetic(tmp_path / "set", n_train=4, n_val=1, n_test=1,
                                        image_size=32)
    assert path.is_file() and sorted(os.listdir(tmp_path)) == ["set"]


def test_downloading_a_run_artifact_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    import mlflow

    from pipeline.tracking import runs

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def download_artifacts(run_id=None, artifact_path=None, dst_path=None, **kw):
        # What MLflow does on an HTTP store: a new temporary folder unless told where.
        folder = Path(dst_path or tempfile.mkdtemp())
        target = folder / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"weights of {run_id}")
        return str(target)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    for _ in range(3):
        path = runs.download_run_artifact("r1", "checkpoints/final.safetensors")
        assert path.read_text() == "weights of r1"
    leftovers = [p for p in scratch.iterdir()]
    assert len(leftovers) <= 1, leftovers  # at most the one folder the downloads live in
    assert not [p for p in scratch.rglob("*") if p.is_dir() and p.name.startswith("tmp")]


def test_the_process_group_outlasts_rank_0s_upload_retries(monkeypatch):
    import torch.distributed as dist

    from pipeline.tracking.outage import patience
    from steps.common import distributed_world

    opened = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(opened))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: opened.update(kw) or True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **kw: None)
    with distributed_world() as world:
        assert world.size == 2
    assert "timeout" in opened, opened
    assert opened["timeout"].total_seconds() > 2 * patience()


def test_a_served_file_path_is_read_only_up_to_a_cap(tmp_path):
    from pipeline.evaluate.serving import BadRequest, decode_image

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(300 * 2**20)  # sparse: no disk used
    with pytest.raises(BadRequest, match="MB"):
        decode_image("huge.png", 32, image_root=str(tmp_path))


def test_module_paths_named_in_docstrings_exist():
    named = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for ref in re.findall(r"`((?:pipeline|steps)/[\w/]+\.py)`", path.read_text()):
            if not (ROOT / ref).exists():
                named.append(f"{path.relative_to(ROOT)} names {ref}")
    assert not named, named
