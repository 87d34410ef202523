"""MLflow, for the driver and the workers alike: one parent run per pipeline, one nested child run per
stage (or sweep, or sweep trial).

The chain's durable state lives here: a rerun of a pipeline id finds its parent run by tag and skips
every stage whose child run is FINISHED, starting the next one from that run's `export_uri` (the
Hugging Face export; runs recorded before the tag was renamed carry it as `checkpoint_uri`).
Workers open a Tracker on the stage run the driver created (`Tracker(uri)` touches no experiment
until a run is created or searched).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from raylong.config import flatten

EXPERIMENT = "raylong"
PARENT_TAG = "mlflow.parentRunId"
EXPORT_TAG = "export_uri"  # where a stage's Hugging Face export is
LEGACY_EXPORT_TAG = "checkpoint_uri"  # the same, as runs recorded before the rename call it


def tracking_location_problem(storage_path: str) -> str | None:
    """Why no MLflow store can be chosen for this storage path (None: one can). The default SQLite file must
    live on local disk, so a remote storage path needs MLFLOW_TRACKING_URI."""
    if os.environ.get("MLFLOW_TRACKING_URI") or "://" not in storage_path or storage_path.startswith("file://"):
        return None
    return f"storage_path {storage_path} is remote: set MLFLOW_TRACKING_URI to your MLflow tracking server"


def default_tracking_uri(storage_path: str) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the (local) storage directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    problem = tracking_location_problem(storage_path)
    if problem:
        raise ValueError(problem)
    local = storage_path.removeprefix("file://")
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{os.path.abspath(local)}/mlflow.db"


@dataclass
class StageRecord:
    run_id: str
    stage: str
    status: str
    tags: dict[str, str]

    @property
    def export_uri(self) -> str | None:
        return self.tags.get(EXPORT_TAG) or self.tags.get(LEGACY_EXPORT_TAG)


@contextlib.contextmanager
def sqlite_setup_lock(tracking_uri: str):
    """Two drivers opening a new SQLite store at once both try to create its tables: serialise that
    first contact with a lock file next to the database (a tracking server needs none)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = tracking_uri.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    """Every MLflow read and write raylong makes goes through here."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None, experiment: str = EXPERIMENT):
        self.tracking_uri = tracking_uri
        with sqlite_setup_lock(tracking_uri):  # the client's first contact creates a new SQLite store's tables
            self.client = MlflowClient(tracking_uri)
        self._artifact_root, self._experiment, self._experiment_id = artifact_root, experiment, None

    def __reduce__(self):  # travels to Ray Tune trials as its settings; the client is rebuilt there
        return (_reopen_tracker, (self.tracking_uri, self._artifact_root, self._experiment, self._experiment_id))

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (serialised for a new SQLite store)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            with sqlite_setup_lock(self.tracking_uri):
                exp = self.client.get_experiment_by_name(self._experiment)
                if exp is not None:
                    self._experiment_id = exp.experiment_id
                else:
                    try:
                        self._experiment_id = self.client.create_experiment(self._experiment,
                                                                            artifact_location=self._artifact_root)
                    except MlflowException:  # created meanwhile by another driver (tracking server)
                        self._experiment_id = self.client.get_experiment_by_name(self._experiment).experiment_id
        return self._experiment_id

    # ------------------------------------------------------------------------------ pipeline
    def find_pipeline(self, pipeline_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.pipeline_id = '{pipeline_id}' and tags.kind = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_pipeline(self, pipeline_id: str, recipe_name: str, recipe_json: str) -> str:
        """The pipeline's parent run: reopened when it exists, else created."""
        run_id = self.find_pipeline(pipeline_id)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=pipeline_id,
            tags={"pipeline_id": pipeline_id, "kind": "pipeline", "recipe": recipe_name},
        )
        self.client.log_text(run.info.run_id, recipe_json, "recipe.json")
        return run.info.run_id

    # --------------------------------------------------------------------------------- stages
    def stage_runs(self, parent_id: str) -> list[StageRecord]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
        return [StageRecord(r.info.run_id, r.data.tags.get("stage", ""), r.info.status, r.data.tags) for r in runs]

    def close_interrupted_stages(self, parent_id: str) -> list[str]:
        """Child runs left RUNNING by a driver that died are marked KILLED (tag `interrupted`); returns
        their stage names. Called when a pipeline id is (re)started."""
        closed = []
        for rec in self.stage_runs(parent_id):
            if rec.status == "RUNNING":
                self.client.set_tag(rec.run_id, "interrupted", "driver lost; resumed by a later run")
                self.client.set_terminated(rec.run_id, "KILLED")
                closed.append(rec.stage)
        return closed

    def finished_stage(self, parent_id: str, stage: str) -> StageRecord | None:
        for rec in reversed(self.stage_runs(parent_id)):
            if rec.stage == stage and rec.status == "FINISHED":
                return rec
        return None

    def start_stage(self, parent_id: str, pipeline_id: str, index: int, stage_dump: dict, tags: dict[str, str]) -> str:
        return self.start_child(parent_id, pipeline_id, "stage", f"{index}-{stage_dump['name']}", stage_dump,
                                {"stage": stage_dump["name"], "stage_index": str(index), **tags})

    def start_child(self, parent_id: str | None, pipeline_id: str, kind: str, name: str, params: dict,
                    tags: dict[str, str]) -> str:
        """A run of `kind` (stage, sweep, trial) nested under `parent_id` (None: top level), params flattened."""
        nesting = {PARENT_TAG: parent_id} if parent_id else {}
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**nesting, "pipeline_id": pipeline_id, "kind": kind, **tags})
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """One log_batch per 500 metrics (None values left out)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, run_id: str, obj: dict, name: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=2), name)

    def log_artifacts(self, run_id: str, directory: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, directory, artifact_path)

    def download_artifact(self, run_id: str, path: str, dest: str) -> str | None:
        """A local copy of one artifact of the run, or None when it has none at `path`."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.download_artifacts(run_id, path, dest)
        except (MlflowException, OSError):
            return None

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def model_version_of_run(self, name: str, run_id: str) -> str | None:
        """The version of registered model `name` created from run `run_id`, if there is one."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        return next((mv.version for mv in versions if mv.run_id == run_id), None)

    def create_model_version(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` (created if needed) pointing at an MLflow model."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="raylong: final stage exports")
        except MlflowException:
            pass  # already registered
        return self.client.create_model_version(name, source=source, run_id=run_id, tags=tags).version

    def metric_history(self, run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _reopen_tracker(tracking_uri: str, artifact_root: str | None, experiment: str, experiment_id: str | None) -> Tracker:
    tracker = Tracker(tracking_uri, artifact_root, experiment)
    tracker._experiment_id = experiment_id
    return tracker
