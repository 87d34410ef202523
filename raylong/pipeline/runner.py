"""The stage chain: for each stage, data -> train -> record, each starting from the previous export.

Ray Workflows is gone from Ray 2.60, so the driver runs the chain itself: a Ray Data job and a
TorchTrainer.fit() per stage. Durable state is MLflow (which stages FINISHED, where their exports are)
plus the storage path (packed data with commit markers, Ray Train checkpoints, exports with
EXPORT.json). Rerunning a pipeline id skips finished stages and resumes an interrupted one from its
latest complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylong.config import BASE_RUN, PipelineConfig, StageConfig
from raylong.credentials import credential_names
from raylong.log import get_logger
from raylong.pipeline.context import PipelineContext, new_pipeline_id
from raylong.storage import exists, for_users
from raylong.tracking import EXPORT_TAG

log = get_logger(__name__)


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


def run_pipeline(cfg: PipelineConfig, pipeline_id: str | None = None, tracking_uri: str | None = None,
                 check_plan: bool = True, worker_cls=None) -> PipelineResult:
    """`worker_cls`: a StageWorker subclass the stages' (and the base run's) workers run instead (tests inject
    faults with it)."""
    from raylong.train.model import export_complete

    ctx = PipelineContext.open(cfg, pipeline_id or new_pipeline_id(cfg), tracking_uri, check_plan)
    tracker = ctx.tracker
    parent = tracker.start_pipeline(ctx.pipeline_id, cfg.name, cfg.model_dump_json(indent=2))
    for stage_name in tracker.close_interrupted_stages(parent):
        log.info("stage %s: its previous run was interrupted (driver lost); marked KILLED", stage_name)
    result = PipelineResult(ctx.pipeline_id, parent, ctx.tracking_uri)
    ctx.describe("pipeline")
    if credential_names():  # names only: values never reach a log, a param or a tag
        log.info("credentials from the environment, forwarded to workers: %s", ", ".join(credential_names()))
    try:
        ctx.start()
        if cfg.evaluate_base:
            evaluate_base(ctx, parent, worker_cls)
        exports: dict[str, str] = {}
        carried = {cfg.init_stage_of(j) for j, s in enumerate(cfg.stages) if s.optim.carry_optimizer_state}
        for index, stage in enumerate(cfg.stages):
            init_stage = cfg.init_stage_of(index)
            init_uri = ctx.base_model_uri if init_stage is None else exports[init_stage]
            done = tracker.finished_stage(parent, stage.name)
            if done is not None and done.export_uri and export_complete(done.export_uri) is not None:
                exports[stage.name] = done.export_uri
                result.stages.append(StageOutcome(stage.name, done.run_id, done.export_uri, skipped=True))
                log.info("stage %d %s: FINISHED in run %s, skipped", index, stage.name, done.run_id)
                continue
            upcoming = cfg.stages[index + 1] if index + 1 < len(cfg.stages) else None
            outcome = run_stage(ctx, parent, index, stage, init_uri, save_optimizer=stage.name in carried,
                                worker_cls=worker_cls, prefetch=upcoming)
            exports[stage.name] = outcome.export_uri
            result.stages.append(outcome)
        finish_pipeline(ctx, parent, result)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    finally:
        ctx.close()
    tracker.end_run(parent, "FINISHED")
    return result


def finish_pipeline(ctx: PipelineContext, parent: str, result: PipelineResult) -> None:
    """Comparison across stages on the parent run; the last export becomes a registered model version."""
    from raylong.pipeline.report import compare_pipeline

    from raylong.pipeline.registry import register_final_model

    cfg = ctx.cfg
    compare_pipeline(ctx.tracker, ctx.pipeline_id)
    last = result.stages[-1]
    name = cfg.registered_model or f"{cfg.name}-final"
    version = register_final_model(ctx.tracker, name, for_users(last.export_uri), last.run_id,
                                   {"pipeline_id": ctx.pipeline_id, "recipe": cfg.name, "stage": last.name})
    ctx.tracker.set_tags(parent, {"registered_model": f"{name}/{version}"})


def base_eval_stage(cfg: PipelineConfig, base_config: dict) -> StageConfig | None:
    """The base model's evaluation as a stage: the longest evaluated stage (its lengths, tasks and worker
    layout) run as the base was trained (its own RoPE) on plain prompts (it is not an instruct model).
    None when no stage evaluates retrieval."""
    from raylong.train.model import rope_of

    scored = [s for s in cfg.stages if s.eval.enabled and s.eval.filler]
    if not scored:
        return None
    longest = max(reversed(scored), key=lambda s: s.seq_len)  # the last of the longest
    return longest.model_copy(deep=True, update={"name": BASE_RUN, "kind": "pretrain", "rope": rope_of(base_config),
                                                  "init_from": None, "sweep": None})


def evaluate_base(ctx: PipelineContext, parent: str, worker_cls=None) -> None:
    """Score the model the chain starts from with the longest stage's retrieval tasks at every length,
    in its own child run ('base', stage_index -1), so every stage compares against it. Once per pipeline.
    `worker_cls`: as run_stage's (the workers' seam)."""
    import json

    from raylong.eval.build import build_eval_suite
    from raylong.storage import read_text, write_text
    from raylong.train.launch import run_training
    from raylong.train.spec import WorkerMode, WorkerSpec

    tracker, cfg = ctx.tracker, ctx.cfg
    if tracker.finished_stage(parent, BASE_RUN) is not None:
        log.info("base model: evaluated in an earlier run, skipped")
        return
    stage = base_eval_stage(cfg, json.loads(read_text(f"{ctx.base_model_uri}/config.json")))
    if stage is None:
        log.info("base model: no stage evaluates retrieval, nothing to score it with")
        return
    suite_uri, suite = ctx.paths.eval_suite(BASE_RUN), build_eval_suite(stage, ctx.tokenizer_local)
    write_text(suite_uri, suite.to_json())
    run_id = tracker.start_stage(parent, ctx.pipeline_id, -1, stage.model_dump(mode="json"),
                                 {"init_from": for_users(ctx.base_model_uri)})
    log.info("base model: scoring %s at %s tokens (rope %s)", ", ".join(stage.eval.tasks),
             sorted({item.length for item in suite.passkey}), stage.rope.to_hf())
    try:
        spec = WorkerSpec(stage=stage, mode=WorkerMode.EVAL, init_uri=ctx.base_model_uri,
                          tokenizer_uri=ctx.tokenizer_uri, train_uri=None, eval_suite_uri=suite_uri,
                          tracking_uri=ctx.tracking_uri, mlflow_run_id=run_id)
        run_training(spec, run_name=f"{ctx.pipeline_id}-{BASE_RUN}", storage_path=ctx.paths.train,
                     worker_cls=worker_cls)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")


def run_stage(ctx: PipelineContext, parent: str, index: int, stage: StageConfig, init_uri: str,
              save_optimizer: bool = False, worker_cls=None, prefetch: StageConfig | None = None) -> StageOutcome:
    """data -> train -> export -> record, for one stage, inside its own child run. `prefetch`: the next
    stage, whose data is prepared in the background once this stage's is ready."""
    from raylong.train.launch import run_training
    from raylong.train.model import export_complete

    tracker, paths = ctx.tracker, ctx.paths
    init_manifest = export_complete(init_uri) if exists(init_uri) else None
    export_uri = paths.export(stage.name)
    run_id = tracker.start_stage(parent, ctx.pipeline_id, index, stage.model_dump(mode="json"), {
        "init_from": for_users(init_uri),
        "init_checksum": (init_manifest or {}).get("checksum", "n/a"),
    })
    log.info("stage %d %s: %s at %d tokens from %s (MLflow run %s)", index, stage.name, stage.kind, stage.seq_len,
             init_uri, run_id)
    try:
        inputs = ctx.prepare_stage(stage)
        if prefetch is not None:
            ctx.prefetch_stage(prefetch)
        tracker.log_json(run_id, inputs.data_report, "data_report.json")
        tracker.log_metrics(run_id, {f"data/{k}": v for k, v in inputs.data_report.items() if isinstance(v, (int, float))})
        tracker.set_tags(run_id, {"data_dir": inputs.data_directory, "data_cached": str(inputs.data_cached),
                                  "data_prefetched": str(inputs.prefetched)})
        init_stage = ctx.cfg.init_stage_of(index)
        spec = ctx.worker_spec(
            stage, inputs, init_uri, run_id, export_uri=export_uri,
            save_optimizer_to=paths.optimizer_state(stage.name) if save_optimizer else None,
            optimizer_from=paths.optimizer_state(init_stage) if stage.optim.carry_optimizer_state else None)
        fit = run_training(spec, run_name=f"{ctx.pipeline_id}-{stage.name}", storage_path=paths.train,
                           worker_cls=worker_cls)
        manifest = export_complete(export_uri)
        if manifest is None:
            raise RuntimeError(f"stage {stage.name}: training ended without a complete export at {export_uri}")
        fit_metrics = fit.metrics or {}
        tracker.set_tags(run_id, {
            EXPORT_TAG: for_users(export_uri),
            "export_checksum": manifest["checksum"],
            "resumed_from_step": str(fit_metrics.get("resumed_from_step", 0)),
            **({"skipped_checkpoints": fit_metrics["skipped_checkpoints"]} if fit_metrics.get("skipped_checkpoints") else {}),
        })
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    return StageOutcome(stage.name, run_id, export_uri, skipped=False)
