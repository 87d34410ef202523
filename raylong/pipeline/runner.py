"""The stage chain: for each stage, data -> train -> record, each starting from the previous export.

Ray Workflows is gone from Ray 2.60, so the driver runs the chain itself: a Ray Data job and a
TorchTrainer.fit() per stage. Durable state is MLflow (which stages FINISHED, where their exports are)
plus the storage path (packed data with commit markers, Ray Train checkpoints, exports with
EXPORT.json). Rerunning a pipeline id skips finished stages and resumes an interrupted one from its
latest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from raylong.config import PipelineConfig, StageConfig, redact
from raylong.pipeline.preflight import preflight
from raylong.pipeline.tracking import Tracker, default_tracking_uri
from raylong.train.launch import credential_names
from raylong.storage import absolute, download_dir, exists, for_users, upload_dir

log = logging.getLogger("raylong.pipeline")


@dataclass
class StageOutcome:
    name: str
    run_id: str
    export_uri: str
    skipped: bool


@dataclass
class PipelineResult:
    pipeline_id: str
    parent_run_id: str
    tracking_uri: str
    stages: list[StageOutcome] = field(default_factory=list)


class PipelinePaths:
    """Where one pipeline keeps its things under the storage path."""

    def __init__(self, storage_path: str, pipeline_id: str):
        self.storage = absolute(storage_path)
        self.root = f"{self.storage}/{pipeline_id}"
        self.tokenizer = f"{self.root}/assets/tokenizer"
        self.base_model = f"{self.root}/assets/base_model"
        self.data = f"{self.root}/data"
        self.train = f"{self.root}/train"

    def export(self, stage: str) -> str:
        return f"{self.root}/stages/{stage}/export"

    def optimizer_state(self, stage: str) -> str:
        return f"{self.root}/stages/{stage}/optimizer"


def ensure_tokenizer(cfg: PipelineConfig, paths: PipelinePaths) -> str:
    """The tokenizer directory: `tokenizer.path` if it exists, else train the configured BPE once."""
    from raylong.data.tokenize import train_bpe_tokenizer

    if cfg.tokenizer.path is not None:
        return cfg.tokenizer.path
    if not exists(f"{paths.tokenizer}/tokenizer.json"):
        t = cfg.tokenizer.train
        with tempfile.TemporaryDirectory() as tmp:
            from raylong.config import expand_path

            train_bpe_tokenizer(expand_path(t.files), t.vocab_size, tmp, t.max_files)
            upload_dir(tmp, paths.tokenizer)
        log.info("trained a %d-token BPE tokenizer -> %s", t.vocab_size, paths.tokenizer)
    return paths.tokenizer


def ensure_base_model(cfg: PipelineConfig, tokenizer_dir: str, paths: PipelinePaths) -> str:
    """The chain's starting weights: `model.path`, or a random init written once as an HF export."""
    from raylong.train.model import export_complete, init_random_model

    if cfg.model.path is not None:
        return cfg.model.path
    if export_complete(paths.base_model) is None:
        init_random_model(cfg.model, tokenizer_dir, paths.base_model)
    return paths.base_model


def ensure_ray() -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS), else start a local one bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # GCS, raylet, workers on 127.0.0.1
    # the dashboard serves the State API, which Ray Train's placement-group cleaner needs to free the
    # resources of a run whose controller was killed (a sweep trial stopped early)
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def run_pipeline(cfg: PipelineConfig, pipeline_id: str | None = None, tracking_uri: str | None = None,
                 check_plan: bool = True) -> PipelineResult:
    from raylong.train.model import export_complete

    pipeline_id = pipeline_id or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = PipelinePaths(cfg.storage_path, pipeline_id)
    preflight(cfg, check_plan)
    tracking_uri = tracking_uri or default_tracking_uri(paths.storage)
    tracker = Tracker(tracking_uri, artifact_root=f"{paths.storage}/mlartifacts")
    parent = tracker.start_pipeline(pipeline_id, cfg.name, cfg.model_dump_json(indent=2))
    for stage_name in tracker.close_interrupted_stages(parent):
        print(f"[raylong] stage {stage_name}: its previous run was interrupted (driver lost); marked KILLED", flush=True)
    result = PipelineResult(pipeline_id, parent, tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # forwarded to the training workers
    print(f"[raylong] pipeline {pipeline_id}: {len(cfg.stages)} stages, storage {redact(paths.root)}, MLflow {redact(tracking_uri)}",
          flush=True)
    names = credential_names()
    if names:  # names only: values never reach a log, a param or a tag
        print(f"[raylong] credentials from the environment, forwarded to workers: {', '.join(names)}", flush=True)
    ensure_ray()
    try:
        tokenizer_uri = ensure_tokenizer(cfg, paths)
        tokenizer_local = download_dir(tokenizer_uri, tempfile.mkdtemp(prefix="raylong-tok-"))
        base_uri = ensure_base_model(cfg, tokenizer_local, paths)
        exports: dict[str, str] = {}
        carried = {cfg.init_stage_of(j) for j, s in enumerate(cfg.stages) if s.optim.carry_optimizer_state}
        for index, stage in enumerate(cfg.stages):
            init_stage = cfg.init_stage_of(index)
            init_uri = base_uri if init_stage is None else exports[init_stage]
            done = tracker.finished_stage(parent, stage.name)
            if done is not None and export_complete(done.tags["checkpoint_uri"]) is not None:
                exports[stage.name] = done.tags["checkpoint_uri"]
                result.stages.append(StageOutcome(stage.name, done.run_id, exports[stage.name], skipped=True))
                print(f"[raylong] stage {index} {stage.name}: FINISHED in run {done.run_id}, skipped", flush=True)
                continue
            outcome = run_stage(tracker, parent, pipeline_id, index, stage, init_uri, tokenizer_uri, tokenizer_local, paths,
                                save_optimizer=stage.name in carried,
                                optimizer_from=paths.optimizer_state(init_stage) if stage.optim.carry_optimizer_state else None)
            exports[stage.name] = outcome.export_uri
            result.stages.append(outcome)
        finish_pipeline(tracker, cfg, pipeline_id, parent, result)
    except BaseException:
        tracker.end_pipeline(parent, "FAILED")
        raise
    tracker.end_pipeline(parent, "FINISHED")
    return result


def finish_pipeline(tracker: Tracker, cfg: PipelineConfig, pipeline_id: str, parent: str, result: PipelineResult) -> None:
    """Comparison across stages on the parent run; the last export becomes a registered model version."""
    from raylong.pipeline.report import compare_pipeline

    compare_pipeline(tracker, pipeline_id)
    last = result.stages[-1]
    name = cfg.registered_model or f"{cfg.name}-final"
    version = tracker.register_export(name, for_users(last.export_uri), last.run_id,
                                      {"pipeline_id": pipeline_id, "recipe": cfg.name, "stage": last.name})
    tracker.set_tags(parent, {"registered_model": f"{name}/{version}"})
    print(f"[raylong] registered {last.export_uri} as MLflow model {name} version {version}", flush=True)


def run_stage(tracker: Tracker, parent: str, pipeline_id: str, index: int, stage: StageConfig, init_uri: str,
              tokenizer_uri: str, tokenizer_local: str, paths: PipelinePaths, save_optimizer: bool = False,
              optimizer_from: str | None = None) -> StageOutcome:
    """data -> train -> export -> record, for one stage, inside its own child run."""
    from raylong.data.prepare import DataError, prepare_stage_data
    from raylong.train.launch import run_training
    from raylong.train.loop import StageRun
    from raylong.train.model import export_complete

    init_manifest = export_complete(init_uri) if exists(init_uri) else None
    export_uri = paths.export(stage.name)
    run_id = tracker.start_stage(parent, pipeline_id, index, stage.model_dump(mode="json"), {
        "init_from": for_users(init_uri),
        "init_checksum": (init_manifest or {}).get("checksum", "n/a"),
    })
    print(f"[raylong] stage {index} {stage.name}: {stage.kind} at {stage.seq_len} tokens from {init_uri} "
          f"(MLflow run {run_id})", flush=True)
    try:
        data = prepare_stage_data(stage, tokenizer_local, paths.data)
        tracker.log_json(run_id, data.report, "data_report.json")
        tracker.log_metrics(run_id, {f"data/{k}": v for k, v in data.report.items() if isinstance(v, (int, float))})
        tracker.set_tags(run_id, {"data_dir": data.directory, "data_cached": str(data.cached)})
        if data.train_sequences < stage.parallel.num_workers:
            raise DataError(f"stage {stage.name!r}: {data.train_sequences} training sequences for "
                            f"{stage.parallel.num_workers} workers; every worker needs at least one")
        run = StageRun(stage=stage.model_dump(mode="json"), init_dir=init_uri, tokenizer_dir=tokenizer_uri,
                       train_path=data.train_path, export_dir=export_uri, mlflow_run_id=run_id,
                       save_optimizer_to=paths.optimizer_state(stage.name) if save_optimizer else None,
                       optimizer_from=optimizer_from)
        if stage.eval.enabled:
            from raylong.eval.build import build_eval_suite
            from raylong.storage import write_text

            run.eval_suite = f"{paths.root}/eval/{stage.name}.json"
            run.heldout_path = data.heldout_path
            write_text(run.eval_suite, build_eval_suite(stage, tokenizer_local).to_json())
        fit = run_training(stage, run, run_name=f"{pipeline_id}-{stage.name}", storage_path=paths.train)
        manifest = export_complete(export_uri)
        if manifest is None:
            raise RuntimeError(f"stage {stage.name}: training ended without a complete export at {export_uri}")
        fit_metrics = fit.metrics or {}
        tracker.set_tags(run_id, {
            "checkpoint_uri": for_users(export_uri),
            "export_checksum": manifest["checksum"],
            "resumed_from_step": str(fit_metrics.get("resumed_from_step", 0)),
            **({"skipped_checkpoints": fit_metrics["skipped_checkpoints"]} if fit_metrics.get("skipped_checkpoints") else {}),
        })
        tracker.end_stage(run_id, "FINISHED")
    except BaseException:
        tracker.end_stage(run_id, "FAILED")
        raise
    return StageOutcome(stage.name, run_id, export_uri, skipped=False)
