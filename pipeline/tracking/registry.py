"""The MLflow Model Registry side of the pipeline: promote, reject, resolve.

Registered models and aliases (the README's "MLflow" section):
- `vision-bridge`, alias `stage2-ready`: Stage 1 weights the gate approved.
- `report-vlm`, aliases `candidate` (latest Stage 2) and `champion` (best evaluated).
Versions are pyfunc models whose artifacts hold our safetensors checkpoint.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import STAGE2_FINAL, final_checkpoint_path, read_metadata
from pipeline.tracking.runs import download_run_artifact, latest_run

VISION_MODEL = "vision-bridge"
VISION_ALIAS = "stage2-ready"
REPORT_MODEL = "report-vlm"
VERDICT_TAG = "gate.verdict"
REASONS_TAG = "gate.reasons"
PIP_REQUIREMENTS = ["torch", "safetensors", "transformers", "mlflow", "pillow", "numpy"]


def _log_pyfunc(name: str, checkpoint, metadata=None, params=None):
    """Log a models-from-code pyfunc whose artifact is our checkpoint (no pickled objects).

    The signature declares a string column `image` (path or base64) and the inference
    params, so `dataframe_records` / `inputs` requests work and params reach `predict`.
    """
    import pandas as pd
    from mlflow.models import infer_signature

    code = Path(__file__).parents[1] / "pyfunc_models" / f"{name}.py"
    signature = infer_signature(pd.DataFrame({"image": ["path-or-base64"]}), None, params=params)
    with warnings.catch_warnings():
        # MLflow suggests type hints on predict; the signature above serves that purpose.
        warnings.filterwarnings("ignore", message=".*type hint.*")
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(name=name, python_model=str(code),
                                       artifacts={"checkpoint": str(checkpoint)},
                                       pip_requirements=PIP_REQUIREMENTS, metadata=metadata,
                                       signature=signature)


def _versions_from_run(name: str, source_run: str) -> list:
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}' and tag.source_run='{source_run}'")
    except MlflowException:
        return []
    return sorted(versions, key=lambda v: int(v.version))


def alias_version(name: str, alias: str) -> str | None:
    """The version number an alias points at, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def vision_version_of_run(source_run: str) -> str | None:
    """The approved `vision-bridge` version registered from this Stage 1 run, or None."""
    approved = [v for v in _versions_from_run(VISION_MODEL, source_run)
                if v.tags.get(VERDICT_TAG) == "approved"]
    return approved[0].version if approved else None


def promote_vision_bridge(checkpoint: str | Path, source_run: str | None,
                          tags: Mapping[str, str]) -> str:
    """Register the checkpoint (once per source run) and point `stage2-ready` at it.

    Idempotent: a run validated again reuses its version. Under a race two versions may be
    created; the lowest wins, the others are deleted, so the alias converges on one.
    """
    client = MlflowClient()
    key = source_run or f"file:{tags.get('checkpoint_sha256', '')}"
    existing = _versions_from_run(VISION_MODEL, key)
    if not existing:
        info = _log_pyfunc("vision_bridge", checkpoint)
        mlflow.register_model(info.model_uri, VISION_MODEL,
                              tags={**tags, "source_run": key, VERDICT_TAG: "approved"})
        existing = _versions_from_run(VISION_MODEL, key)
    keep, *extra = existing
    for version in extra:
        client.delete_model_version(VISION_MODEL, version.version)
    for k, v in tags.items():
        client.set_model_version_tag(VISION_MODEL, keep.version, k, str(v))
    client.set_model_version_tag(VISION_MODEL, keep.version, VERDICT_TAG, "approved")
    client.set_registered_model_alias(VISION_MODEL, VISION_ALIAS, keep.version)
    return keep.version


def reject_stage1(source_run: str | None, reasons: list[str],
                  checkpoint_sha256: str | None = None) -> None:
    """Tag the run rejected; un-alias and tag any version registered from it earlier.

    A bare checkpoint (no run) is known by its sha256: versions registered from the same file
    (`source_run` = `file:<sha256>`, as `promote_vision_bridge` keys them) are un-aliased.
    """
    client = MlflowClient()
    text = "; ".join(reasons)[:4900]
    if source_run:
        client.set_tag(source_run, VERDICT_TAG, "rejected")
        client.set_tag(source_run, REASONS_TAG, text)
    key = source_run or (f"file:{checkpoint_sha256}" if checkpoint_sha256 else None)
    if key:
        for version in _versions_from_run(VISION_MODEL, key):
            client.set_model_version_tag(VISION_MODEL, version.version, VERDICT_TAG, "rejected")
            if alias_version(VISION_MODEL, VISION_ALIAS) == version.version:
                client.delete_registered_model_alias(VISION_MODEL, VISION_ALIAS)


def mark_approved(source_run: str) -> None:
    """Tag a Stage 1 run approved."""
    client = MlflowClient()
    client.set_tag(source_run, VERDICT_TAG, "approved")
    client.set_tag(source_run, REASONS_TAG, "")


def download_checkpoint(uri: str, name_hint: str = "") -> Path:
    """A local safetensors file for a path, `runs:/` or `models:/` URI."""
    if "://" not in uri and ":/" not in uri:
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        return path
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as exc:
        raise FileNotFoundError(f"cannot resolve {uri}: {exc.message}") from exc
    if os.path.isfile(local):
        return Path(local)
    found = sorted(glob.glob(os.path.join(local, "**", f"*{name_hint}*.safetensors"),
                             recursive=True))
    if not found:
        raise FileNotFoundError(f"no {name_hint or ''} safetensors checkpoint under {uri}")
    # A folder (a run's `checkpoints/`) resolves to its final weights, the ones a registered
    # version holds, never to `best_val` merely because it sorts first.
    finals = [p for p in found if Path(p).stem.endswith("_final")]
    return Path((finals or found)[0])


def model_version_run(uri: str) -> str | None:
    """For `models:/name@alias` or `models:/name/version`, the version's `source_run` tag."""
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = ref.split("/", 1)
        version = client.get_model_version(name, number)
    return version.tags.get("source_run")


def latest_stage2_final() -> Path | None:
    """The newest finished Stage 2 run's `vision_bridge_vlm_final` checkpoint, downloaded."""
    run = latest_run("stage2")
    if run is None:
        return None
    return download_run_artifact(run.info.run_id, final_checkpoint_path(STAGE2_FINAL))


def run_verdict(run_id: str | None) -> str | None:
    """The `gate.verdict` tag of a run (None when the run or tag is unknown)."""
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id).data.tags.get(VERDICT_TAG)
    except MlflowException:
        return None


def register_report_model(checkpoint: str | Path, run_id: str, llm_name: str,
                          tags: Mapping[str, str]) -> str:
    """Log the Stage 2 weights as a pyfunc model (LLM by reference) and alias it `candidate`."""
    info = _log_pyfunc("report_vlm", checkpoint, metadata={"llm": llm_name},
                       params={"num_beams": 1, "max_new_tokens": 0})
    version = mlflow.register_model(info.model_uri, REPORT_MODEL,
                                    tags={**tags, "source_run": run_id, "llm": llm_name})
    MlflowClient().set_registered_model_alias(REPORT_MODEL, "candidate", version.version)
    return version.version


def resolve_stage2_checkpoint(ref: str) -> tuple[Path, str | None]:
    """(local final checkpoint, Stage 2 run id) for a run id, URI or path."""
    if ref.startswith(("runs:/", "models:/")) or "/" in ref or ref.endswith(".safetensors"):
        path = download_checkpoint(ref, "vision_bridge_vlm")
    else:  # a bare run id
        try:
            path = Path(mlflow.artifacts.download_artifacts(
                run_id=ref, artifact_path=final_checkpoint_path(STAGE2_FINAL)))
        except MlflowException as exc:
            raise FileNotFoundError(f"run {ref} has no Stage 2 final checkpoint: "
                                    f"{exc.message}") from exc
    return path, read_metadata(path).get("run_id")


def champion_state() -> tuple[str | None, float | None, str | None]:
    """(version, score, comparison key) of the current `report-vlm@champion`, or Nones."""
    current = alias_version(REPORT_MODEL, "champion")
    if current is None:
        return None, None, None
    tags = MlflowClient().get_model_version(REPORT_MODEL, current).tags
    score = tags.get("eval.score")
    return current, float(score) if score is not None else None, tags.get("eval.key")


def record_champion_verdict(source_run: str | None, verdict, score: float, definition: str,
                            key: str, summary: dict[str, str], description: str = "",
                            sample_report: str = "") -> str:
    """Tag the evaluated `report-vlm` version with its scores and the champion verdict; move
    `champion` to it when the verdict approves; say both on the registered model's page.
    Returns one line saying what happened."""
    client = MlflowClient()
    versions = _versions_from_run(REPORT_MODEL, source_run) if source_run else []
    if not versions:
        return "no report-vlm version registered for this model; champion unchanged"
    version = versions[-1].version
    tags = {"eval.score": repr(float(score)), "eval.score_definition": definition,
            "eval.key": key, "champion.verdict": "approved" if verdict.approved else "rejected",
            "champion.reasons": "; ".join(verdict.reasons)[:4000], **summary}
    for name, value in tags.items():
        client.set_model_version_tag(REPORT_MODEL, version, name, value)
    if description:  # shown on the model version's page in the UI
        client.update_model_version(REPORT_MODEL, version, description=description[:5000])
    if verdict.approved:
        client.set_registered_model_alias(REPORT_MODEL, "champion", version)
    client.update_registered_model(REPORT_MODEL, description=_model_description(
        version, verdict, tags, sample_report))
    if not verdict.approved:
        return (f"champion unchanged: report-vlm version {version} rejected: "
                + "; ".join(verdict.reasons))
    return f"champion -> report-vlm version {version} (score {score:.4f})"


def _model_description(version: str, verdict, tags: Mapping[str, str], sample: str) -> str:
    """The registered model's page: the champion, and the latest evaluation's verdict,
    grounding gap and a sample report (its version's page has every score)."""
    champion = alias_version(REPORT_MODEL, "champion")
    lines = [f"**champion: version {champion}**" if champion else
             "**champion: none yet** (no evaluated version has passed the champion gate)", "",
             f"Latest evaluation: version {version}, champion gate: "
             f"**{tags['champion.verdict']}**"
             + (f" ({tags['champion.reasons']})" if not verdict.approved else ""), "",
             f"- grounding gap: {tags.get('eval.grounding_gap', '?')} nats (caption loss with "
             "another study's image minus with its own)",
             f"- coarse finding F1: {tags.get('eval.coarse_f1', '?')} (blind baseline "
             f"{tags.get('eval.blind_coarse_f1', '?')})"]
    if sample:
        lines += [f"- sample report: {sample[:1000]}"]
    return "\n".join(lines)[:5000]
