"""`raylong sweep`: a Ray Tune search over a stage's settings (RoPE base / YaRN factor, learning rate, ...)
before its expensive run.

Each trial is a Ray Train run of the stage at its SP degree, for `sweep.steps` steps from the stage's
start weights, evaluated every `sweep.eval_every` steps by the stage's own evaluation (held-out loss by
position, passkey at the stage's lengths). ASHA stops the worse trials at each evaluation. The sweep is
an MLflow run with one nested run per trial; the best setting is printed, tagged on the sweep run and,
with --write, written back into the recipe.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from raylong.config import PipelineConfig, RecipeError, SweepConfig, set_dotted
from raylong.log import get_logger
from raylong.pipeline.context import PipelineContext, StageInputs, new_pipeline_id
from raylong.tracking import Tracker
from raylong.train.spec import WorkerMode

log = get_logger(__name__)


@dataclass
class SweepResult:
    sweep_run_id: str
    best: dict[str, float]
    best_value: float
    best_trial_run_id: str
    trials: list[dict]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep shares (sent to each Tune trial with tune.with_parameters)."""

    ctx: PipelineContext
    index: int  # the stage's index in the recipe
    inputs: StageInputs
    init_uri: str
    sweep_run_id: str
    trials_storage: str


def init_stage_export(cfg: PipelineConfig, index: int, tracker: Tracker, pipeline_id: str) -> str | None:
    """The export the stage starts from in `pipeline_id` (None: the stage starts from the base model)."""
    init_stage = cfg.init_stage_of(index)
    if init_stage is None:
        return None
    parent = tracker.find_pipeline(pipeline_id)
    done = tracker.finished_stage(parent, init_stage) if parent else None
    if done is None:
        raise RecipeError(f"stage {cfg.stages[index].name!r} starts from stage {init_stage!r}, which has not finished "
                          f"in pipeline {pipeline_id!r}: run the pipeline up to it, or pass that pipeline's --pipeline-id")
    return done.export_uri


def run_trial(candidate: dict, trial: TrialContext) -> None:
    """Tune function trainable: one trial = one Ray Train run with TuneReportCallback forwarding its evals."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylong.train.launch import run_training

    ctx = trial.ctx
    stage = ctx.cfg.stages[trial.index].trial(candidate)
    trial_name = tune.get_context().get_trial_name()
    run_id = ctx.tracker.start_child(trial.sweep_run_id, ctx.pipeline_id, "trial", trial_name,
                                     stage.model_dump(mode="json"),
                                     {"stage": stage.name, "trial": trial_name,
                                      **{f"candidate.{k}": str(v) for k, v in candidate.items()}})
    spec = ctx.worker_spec(stage, trial.inputs, trial.init_uri, run_id, mode=WorkerMode.TRIAL,
                           eval_every=ctx.cfg.stages[trial.index].sweep.eval_every)
    # No terminal status from here: a trial Tune stops can still be unwinding in this thread after the driver
    # settled its run, and a late FAILED would overwrite KILLED. close_trial_runs (the driver) is the one writer.
    run_training(spec, run_name=trial_name, storage_path=trial.trials_storage, max_failures=0,
                 callbacks=[TuneReportCallback()])


def find_sweep(cfg: PipelineConfig, stage_name: str) -> tuple[int, SweepConfig]:
    index = next((i for i, s in enumerate(cfg.stages) if s.name == stage_name), None)
    if index is None:
        raise RecipeError(f"--stage {stage_name!r}: no such stage (stages: {[s.name for s in cfg.stages]})")
    if cfg.stages[index].sweep is None:
        raise RecipeError(f"stages[{index}].sweep: stage {stage_name!r} has no sweep section (space, steps, metric)")
    return index, cfg.stages[index].sweep


def run_sweep(cfg: PipelineConfig, stage_name: str, pipeline_id: str | None = None, tracking_uri: str | None = None,
              recipe_path: str | None = None, write: bool = False) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    index, sweep = find_sweep(cfg, stage_name)
    stage = cfg.stages[index]
    ctx = PipelineContext.open(cfg, pipeline_id or new_pipeline_id(cfg, "sweep"), tracking_uri)
    tracker = ctx.tracker
    log.info("sweep of stage %s in pipeline %s: %d trials over %s, %d steps each, judged by %s (%s)", stage.name,
             ctx.pipeline_id, sweep.num_trials, list(sweep.space), sweep.steps, sweep.metric, sweep.mode)
    ctx.describe("sweep pipeline")
    init_uri = init_stage_export(cfg, index, tracker, ctx.pipeline_id)  # refused here, before Ray, when missing
    ctx.start()
    init_uri = init_uri or ctx.base_model_uri
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = f"{ctx.paths.root}/sweeps/{stage.name}-{stamp}"
    inputs = ctx.prepare_stage(stage, eval_suite_uri=f"{root}/eval_suite.json")

    sweep_run = tracker.start_child(None, ctx.pipeline_id, "sweep", f"sweep-{stage.name}-{stamp}",
                                    {"sweep": sweep.model_dump(mode="json")},
                                    {"stage": stage.name, "metric": sweep.metric, "mode": sweep.mode, "init_from": init_uri,
                                     "recipe": cfg.name})
    trial = TrialContext(ctx, index, inputs, init_uri, sweep_run, f"{root}/trials")
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=sweep.evaluations, grace_period=1,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    space = {key: tune.grid_search(values) for key, values in sweep.space.items()}
    tuner = tune.Tuner(
        # the trial function itself holds nothing: its Ray Train workers hold the stage's CPUs / GPUs
        tune.with_resources(tune.with_parameters(run_trial, trial=trial), {"CPU": 0, "memory": 2**20}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"sweep-{stage.name}-{stamp}", storage_path=root, verbose=1),
    )
    try:
        results = tuner.fit()
        trials = trial_table(results, sweep)
        close_trial_runs(tracker, sweep_run, trials)
        complete = [t for t in trials if t["complete"] and t["value"] is not None]
        if not complete:
            raise RuntimeError(f"sweep of {stage.name}: no trial finished its {sweep.steps} steps with {sweep.metric}: "
                               + "; ".join(str(r.error) for r in results if r.error))
        # the best among trials that ran every step (one ASHA stopped was worse at its rung than a survivor)
        best = (min if sweep.mode == "min" else max)(complete, key=lambda t: t["value"])
        best_values, value, best_run = best["candidate"], float(best["value"]), best["run_id"]
        tracker.set_tags(sweep_run, {"best_trial_run": best_run, **{f"best.{k}": str(v) for k, v in best_values.items()}})
        tracker.log_metrics(sweep_run, {"best_value": value, "trials": len(trials),
                                        "trials_stopped_early": sum(t["stopped_early"] for t in trials)})
        tracker.log_json(sweep_run, {"best": best_values, "best_value": value, "trials": trials}, "sweep.json")
    except BaseException:
        tracker.end_run(sweep_run, "FAILED")
        raise
    tracker.end_run(sweep_run, "FINISHED")
    log.info("trials:\n%s", format_trials(trials, sweep.metric))
    log.info("best %s=%.4f with %s (trial run %s; sweep run %s)", sweep.metric, value, best_values, best_run, sweep_run)
    if write:
        if recipe_path is None:
            raise ValueError("--write needs the recipe path")
        write_best(recipe_path, index, best_values)
        log.info("wrote %s into stages[%d] of %s", best_values, index, recipe_path)
    return SweepResult(sweep_run, best_values, value, best_run, trials)


def trial_table(results, sweep) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        reports = int(m.get("training_iteration", 0))
        rows.append({"candidate": {k: r.config[k] for k in sweep.space}, "run_id": m.get("mlflow_run_id"),
                     "value": m.get(sweep.metric), "step": m.get("step"), "evaluations": reports,
                     "complete": r.error is None and m.get("step") == sweep.steps,
                     "stopped_early": r.error is None and reports < sweep.evaluations, "error": str(r.error) if r.error else None})
    return rows


def format_trials(trials: list[dict], metric: str) -> str:
    lines = [f"{'candidate':<44} {metric:>20} {'step':>5} {'stopped early':>14}"]
    for t in trials:
        value = "n/a" if t["value"] is None else f"{t['value']:.4f}"
        lines.append(f"{str(t['candidate']):<44} {value:>20} {str(t['step']):>5} {str(t['stopped_early']):>14}")
    return "\n".join(lines)


def _candidate_key(candidate: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in candidate.items()))


def close_trial_runs(tracker: Tracker, sweep_run: str, trials: list[dict]) -> None:
    """Settle every trial run's MLflow status from what Tune saw; the driver is the only writer of it. A trial
    the scheduler stopped is KILLED with `stopped_early`; one that ran every step FINISHED; any other FAILED.
    Runs are matched to Tune's results by candidate (a trial that failed before reporting has no run id there)."""
    by_candidate = {_candidate_key(t["candidate"]): t for t in trials}
    for rec in tracker.stage_runs(sweep_run):
        t = by_candidate.get(_candidate_key({k.removeprefix("candidate."): v for k, v in rec.tags.items()
                                             if k.startswith("candidate.")}))
        if t is not None and t["run_id"] is None:
            t["run_id"] = rec.run_id
        if t is not None and t["complete"]:
            tracker.end_run(rec.run_id, "FINISHED")
        elif t is not None and t["stopped_early"]:
            tracker.set_tags(rec.run_id, {"stopped_early": "scheduler"})
            tracker.end_run(rec.run_id, "KILLED")
        else:
            tracker.end_run(rec.run_id, "FAILED")


def write_best(recipe_path: str, index: int, values: dict[str, float]) -> None:
    """Set the best values in stages[index] of the recipe file, keeping its comments and layout."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    path = Path(recipe_path)
    doc = yaml.load(path.read_text())
    for dotted, value in values.items():
        set_dotted(doc["stages"][index], dotted, value, create=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(doc, f)
    from raylong.config import load_recipe

    load_recipe(tmp)  # the written recipe still validates before it replaces the original
    os.replace(tmp, path)

