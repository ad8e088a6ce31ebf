"""Everything that talks to MLflow tracking (the registry lives in `pipeline.tracking.registry`,
the per-step metrics sink in `pipeline.tracking.sink`).

Run-level calls that are safe to repeat (tags, params, artifacts, the run's end) ride out an
unreachable tracking server (`pipeline.tracking.outage`).
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
from mlflow.exceptions import ExecutionException, MlflowException
from mlflow.tracking import MlflowClient

from pipeline import interrupts
from pipeline.tracking.outage import call_or_none, call_patiently

EXPERIMENT_NAME = "radiology-report-vlm"
STAGE_TAG = "pipeline.stage"
INTERRUPTED_TAG = "pipeline.interrupted"  # "true" on a run ended by SIGINT/SIGTERM
PROJECT_DIR_ENV = "REPORT_VLM_PROJECT_DIR"  # where `main` finds the MLproject of its steps
# Tracking failures a step reports in one line (steps never import mlflow themselves).
StepFailed = ExecutionException  # an `mlflow run` child step that exited non-zero
TRACKING_ERRORS = (MlflowException, StepFailed)


@contextlib.contextmanager
def _sqlite_init_lock() -> Iterator[None]:
    """Serialise first contact with a local sqlite store across processes.

    MLflow creates and migrates a new sqlite store on first use; two processes doing that at
    once fail ("duplicate column name"). An exclusive lock on `<db>.lock` around the first
    call lets one create it and the other find it ready. Other stores need no lock.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = uri.removeprefix("sqlite:///") + ".lock"
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            MlflowClient().search_experiments(max_results=1)  # creates/migrates the store
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _experiment() -> None:
    with _sqlite_init_lock():
        if not (os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                or os.environ.get("MLFLOW_RUN_ID")):
            try:
                mlflow.set_experiment(EXPERIMENT_NAME)
            except MlflowException as exc:
                # Two first runs against a fresh server both create it; one loses the race.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                mlflow.set_experiment(EXPERIMENT_NAME)


@contextlib.contextmanager
def stage_run(stage: str, run_id: str | None = None, run_name: str | None = None,
              nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Open (or, under `mlflow run` / on resume, re-attach to) a run tagged with `stage`.

    SIGINT and SIGTERM become KeyboardInterrupt (`interrupts.stop_signals_raise`) so callers
    can save and end the run KILLED; an interrupted run is never left RUNNING.
    """
    _experiment()
    with interrupts.stop_signals_raise():
        run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested)
        mlflow.set_tag(STAGE_TAG, stage)
        try:
            yield run
        except KeyboardInterrupt:
            with _unless_unreachable("marking the run KILLED"):
                mlflow.set_tag(INTERRUPTED_TAG, "true")  # survives `mlflow run`'s status
                mlflow.end_run("KILLED")
            raise
        except BaseException:
            with _unless_unreachable("marking the run FAILED"):
                mlflow.end_run("FAILED")
            raise
        else:
            call_patiently(mlflow.end_run, "FINISHED", what="ending the run")


@contextlib.contextmanager
def _unless_unreachable(what: str) -> Iterator[None]:
    """While an error unwinds: a tracking failure is reported in one line, never raised, so
    the error that ended the run stays the one raised and printed."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any tracking failure; the real error follows
        print(f"warning: {what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
              file=sys.stderr)


def name_run(name: str) -> None:
    """Rename the active run, so the runs table reads as the pipeline (stage, recipe, verdict).

    Under `mlflow run` the run already exists with a random name; this replaces it."""
    run = mlflow.active_run()
    if run is not None:
        call_patiently(MlflowClient().update_run, run.info.run_id, name=name[:250],
                       what="naming the run")


def log_new_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log params not yet on the active run.

    `mlflow run` already logged the `-P` ones as raw strings and MLflow refuses a changed
    value, so those stay as they are; a differing resolved value goes to `resolved.<key>`.
    """
    return call_patiently(_log_new_params, params, what="logging params")


def _log_new_params(params: Mapping[str, Any]) -> dict[str, str]:
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        value = str(value)[:6000]
        if key not in existing:
            fresh[key] = value
        elif existing[key] != value and f"resolved.{key}" not in existing:
            fresh[f"resolved.{key}"] = value  # e.g. `-P epochs=auto` resolved by the profile
    items = list(fresh.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))
    return fresh


def log_dataset(frame, source: str, name: str, digest: str, context: str,
                profile: Mapping[str, Any] | None = None) -> None:
    """`log_input` the dataset (digest lets MLflow tell datasets apart) and its profile."""
    with warnings.catch_warnings():
        # A local path matches MLflow's local-artifact source twice; it picks the same one.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
        for attempt in range(3):
            try:
                call_patiently(mlflow.log_input, dataset, context=context,
                               what="logging the dataset")
                break
            except MlflowException as exc:
                # MLflow's store gets-or-creates the dataset row without a lock: two runs
                # logging the same dataset at once (a PostgreSQL team server) insert it twice
                # and one fails on the unique key. Once more, it finds the row and links it.
                if attempt == 2 or not _lost_insert_race(exc):
                    raise
    if profile is not None:
        log_dict(dict(profile), f"data/profile_{context}.json")


def _lost_insert_race(exc: MlflowException) -> bool:
    text = str(exc)
    return any(sign in text for sign in ("UniqueViolation", "duplicate key value",
                                         "UNIQUE constraint failed", "Duplicate entry"))


def log_files(paths, artifact_path: str | None = None) -> None:
    """Log each existing file as an artifact."""
    for path in paths:
        if path is not None and Path(path).exists():
            call_patiently(mlflow.log_artifact, str(path), artifact_path=artifact_path,
                           what=f"uploading {Path(path).name}")


def last_logged_step(run_id: str, key: str) -> int:
    """The highest step logged for `key` on a run, or -1."""
    history = MlflowClient().get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def relog_missing(run_id: str, log_metrics, csv_path: str | Path,
                  row_metrics: Callable[[dict], Mapping[str, float]],
                  epoch_history: Mapping[str, list]) -> None:
    """Send the checkpointed points MLflow lacks (a run killed between a step checkpoint and
    its flush): `row_metrics(row)` of each CSV row after the last logged `train_loss` step,
    and the epoch values after the last logged `val_loss` epoch."""
    import csv

    last = last_logged_step(run_id, "train_loss")
    if Path(csv_path).exists():
        with open(csv_path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if int(row["step"]) > last:
                    log_metrics(row_metrics(row), int(row["step"]))
    last_epoch = last_logged_step(run_id, "val_loss")
    for key, series in epoch_history.items():
        for epoch, value in series:
            if epoch > last_epoch:
                log_metrics({key: value}, epoch)


def resume_trainer(run_id: str, trainer, ckpt: Path, meta: Mapping, log) -> None:
    """Continue `trainer` (a `pipeline.train.loop.TrainLoop`) from its step checkpoint `ckpt`
    (`meta`: the checkpoint's metadata), send the checkpointed steps MLflow missed (a run
    killed between save and flush) and say where it resumed."""
    kept = trainer.restore(ckpt, meta["resume"])
    relog_missing(run_id, trainer.log_metrics, trainer.csv_path, trainer.step_metrics,
                  trainer.epoch_history)
    trainer.flush()
    log.info("resumed run %s at step %d (epoch %d, batch %d); CSV rows kept: %d", run_id,
             trainer.step, trainer.state.epoch, trainer.state.batch_in_epoch, kept)


def all_experiment_ids(client: MlflowClient | None = None) -> list[str]:
    """The ids of every experiment in the tracking store."""
    return [e.experiment_id for e in (client or MlflowClient()).search_experiments()]


def get_run(run_id: str):
    """A run (info and data) by id."""
    return MlflowClient().get_run(run_id)


def latest_run(stage: str, status: str = "FINISHED", experiment_ids=None):
    """The newest run tagged `pipeline.stage=stage` with `status`, or None."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = all_experiment_ids(client)
    runs = client.search_runs(
        experiment_ids, filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and "
                                      f"attributes.status = '{status}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def set_run_tags(tags: Mapping[str, str]) -> None:
    """Set tags on the active run (values as strings)."""
    call_patiently(mlflow.set_tags, {k: str(v) for k, v in tags.items()}, what="setting tags")


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Log summary metrics on the active run."""
    call_patiently(mlflow.log_metrics, dict(metrics), what="logging metrics")


def log_param(key: str, value: Any) -> None:
    """Log one param on the active run."""
    call_patiently(mlflow.log_param, key, value, what="logging a param")


def log_dict(obj: Mapping[str, Any], name: str) -> None:
    """Log a dict as a JSON artifact of the active run."""
    call_patiently(mlflow.log_dict, dict(obj), name, what=f"uploading {name}")


def log_table(frame, name: str) -> None:
    """Log a DataFrame as an MLflow table artifact of the active run."""
    call_patiently(mlflow.log_table, frame, name, what=f"uploading {name}")


def active_run_id() -> str | None:
    """The active run's id, or None."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def end_active_run() -> None:
    """End the active run, if any (a step never leaves a run open)."""
    if mlflow.active_run() is not None:
        mlflow.end_run()


def run_entry_point(name: str, params: Mapping[str, str]) -> str:
    """Run an entry point of the project in `$REPORT_VLM_PROJECT_DIR` (default: this folder)
    synchronously; returns its run id. The container image sets it to its code folder: the
    Kubernetes backend's working folder holds an MLproject whose docker_env a nested local run
    must not use."""
    project = os.environ.get(PROJECT_DIR_ENV) or "."
    submitted = mlflow.projects.run(project, entry_point=name, parameters=dict(params),
                                    env_manager="local", synchronous=True)
    return submitted.run_id


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of a run."""
    return dict(MlflowClient().get_run(run_id).data.metrics)


def run_tags(run_id: str) -> dict[str, str]:
    """A run's tags."""
    return dict(MlflowClient().get_run(run_id).data.tags)


def artifact_uri(run_id: str) -> str:
    """Where a run's artifacts live."""
    return MlflowClient().get_run(run_id).info.artifact_uri


def tracking_uri(raw: bool = False) -> str:
    """The tracking URI in use; unless `raw`, the default store as `sqlite:///mlflow.db`."""
    uri = mlflow.get_tracking_uri()
    if not raw and uri.startswith("sqlite:///") and os.path.abspath(uri[len("sqlite:///"):]) == \
            os.path.abspath("mlflow.db"):
        uri = "sqlite:///mlflow.db"
    return uri


def shown_uri(uri: str) -> str:
    """A tracking URI fit to print: a database password is replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def view_hint() -> str:
    """How to look at the runs: open the server's URL, or `mlflow ui` over a local store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {shown_uri(uri)}"
    return f"mlflow ui --backend-store-uri {shown_uri(uri)}"


DOWNLOADS_DIR = "report-vlm-downloads"  # under the system temp folder; one file per artifact


def download_run_artifact(run_id: str, artifact_path: str) -> Path | None:
    """A run's artifact as a local file, or None when the run does not exist or lists no such
    artifact. A server that does not answer is waited for, then raised: never an absence.

    Absence is read from the listing: a `runs:/` download reports every failure, an
    unreachable artifact store included, as a missing path. The file is downloaded into a folder
    of our own (`<tmp>/report-vlm-downloads/<run_id>/`) through a temporary folder removed after
    each call: MLflow, told nowhere, makes a new temporary folder per call on a remote store and
    never removes it.
    """
    import shutil
    import tempfile

    client = MlflowClient()
    folder = posixpath.dirname(artifact_path) or None
    listed = call_or_none(client.list_artifacts, run_id, folder, what="listing artifacts")
    if listed is None or artifact_path not in {f.path for f in listed}:
        return None
    home = Path(tempfile.gettempdir()) / DOWNLOADS_DIR / run_id
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=home, prefix=".download-"))
    try:
        fetched = Path(call_patiently(mlflow.artifacts.download_artifacts, run_id=run_id,
                                      artifact_path=artifact_path, dst_path=str(staging),
                                      what=f"downloading {artifact_path}"))
        target = home / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, target)  # a reader of an earlier download sees a whole file
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


REUSE_TAGS = ("main.source_digest", "main.data_digest")  # main's reuse key, on each child run


def find_reusable_run(entry_point: str, params: Mapping[str, str], key: Mapping[str, str]):
    """A FINISHED run of `entry_point` with the same params (as strings) and reuse key (tags
    `REUSE_TAGS`: the source tree's and the data's content digests). A run without the key
    (from before it, or whose parent stopped before tagging it) is never reused."""
    client = MlflowClient()
    experiment_ids = all_experiment_ids(client)
    runs = client.search_runs(
        experiment_ids, filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}' and "
                                      "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if any(run.data.tags.get(k) != str(v) for k, v in key.items()):
            continue
        if all(run.data.params.get(k) == str(v) for k, v in params.items()):
            return run
    return None


def tag_run(run_id: str, tags: Mapping[str, str]) -> None:
    """Set tags on a run by id (finished or not)."""
    client = MlflowClient()
    for key, value in tags.items():
        call_patiently(client.set_tag, run_id, key, str(value), what="tagging a run")


def source_digest(root: str | Path | None = None) -> str:
    """Short sha256 over the `.py` files of `pipeline/` and `steps/` (paths and contents): the
    code version, with or without `.git`, uncommitted edits included."""
    import hashlib

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in sorted(p for name in ("pipeline", "steps") for p in (root / name).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
