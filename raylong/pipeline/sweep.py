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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raylong.config import PipelineConfig, RecipeError, StageConfig, redact, set_dotted
from raylong.pipeline.runner import PipelinePaths, ensure_base_model, ensure_ray, ensure_tokenizer
from raylong.pipeline.tracking import Tracker, default_tracking_uri
from raylong.storage import download_dir, write_text


@dataclass
class SweepResult:
    sweep_run_id: str
    best: dict[str, float]
    best_value: float
    best_trial_run_id: str
    trials: list[dict]


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
    return done.tags["checkpoint_uri"]


def run_trial(candidate: dict, ctx: dict) -> None:
    """Tune function trainable: one trial = one Ray Train run with TuneReportCallback forwarding its evals."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylong.train.launch import run_training
    from raylong.train.loop import StageRun

    stage = StageConfig.model_validate(ctx["stage"]).trial(candidate)
    os.environ["MLFLOW_TRACKING_URI"] = ctx["tracking_uri"]  # forwarded to the training workers
    tracker = Tracker(ctx["tracking_uri"])
    trial_name = tune.get_context().get_trial_name()
    run_id = tracker.start_child(ctx["sweep_run_id"], ctx["pipeline_id"], "trial", trial_name, stage.model_dump(mode="json"),
                                 {"stage": stage.name, "trial": trial_name,
                                  **{f"candidate.{k}": str(v) for k, v in candidate.items()}})
    run = StageRun(stage=stage.model_dump(mode="json"), init_dir=ctx["init_uri"], tokenizer_dir=ctx["tokenizer_uri"],
                   train_path=ctx["train_path"], export_dir="", mlflow_run_id=run_id, eval_suite=ctx["eval_suite"],
                   heldout_path=ctx["heldout_path"], eval_every=ctx["eval_every"])
    try:
        run_training(stage, run, run_name=trial_name, storage_path=ctx["train_storage"], max_failures=0,
                     callbacks=[TuneReportCallback()])
    except BaseException:
        tracker.end_stage(run_id, "FAILED")
        raise
    tracker.end_stage(run_id, "FINISHED")


def run_sweep(cfg: PipelineConfig, stage_name: str, pipeline_id: str | None = None, tracking_uri: str | None = None,
              recipe_path: str | None = None, write: bool = False) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raylong.data.prepare import prepare_stage_data
    from raylong.eval.build import build_eval_suite
    from raylong.pipeline.preflight import preflight

    index = next((i for i, s in enumerate(cfg.stages) if s.name == stage_name), None)
    if index is None:
        raise RecipeError(f"--stage {stage_name!r}: no such stage (stages: {[s.name for s in cfg.stages]})")
    stage = cfg.stages[index]
    if stage.sweep is None:
        raise RecipeError(f"stages[{index}].sweep: stage {stage_name!r} has no sweep section (space, steps, metric)")
    sweep = stage.sweep
    preflight(cfg)
    pipeline_id = pipeline_id or f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = PipelinePaths(cfg.storage_path, pipeline_id)
    tracking_uri = tracking_uri or default_tracking_uri(paths.storage)
    tracker = Tracker(tracking_uri, artifact_root=f"{paths.storage}/mlartifacts")
    print(f"[raylong] sweep of stage {stage.name} in pipeline {pipeline_id}: {sweep.num_trials} trials over "
          f"{list(sweep.space)}, {sweep.steps} steps each, judged by {sweep.metric} ({sweep.mode}); "
          f"MLflow {redact(tracking_uri)}", flush=True)
    init_uri = init_stage_export(cfg, index, tracker, pipeline_id)  # refused here, before Ray, when missing
    ensure_ray()
    tokenizer_uri = ensure_tokenizer(cfg, paths)
    tokenizer_local = download_dir(tokenizer_uri, tempfile.mkdtemp(prefix="raylong-tok-"))
    init_uri = init_uri or ensure_base_model(cfg, tokenizer_local, paths)
    data = prepare_stage_data(stage, tokenizer_local, paths.data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = f"{paths.root}/sweeps/{stage.name}-{stamp}"
    eval_suite = f"{root}/eval_suite.json"
    write_text(eval_suite, build_eval_suite(stage, tokenizer_local).to_json())

    sweep_run = tracker.start_child(None, pipeline_id, "sweep", f"sweep-{stage.name}-{stamp}",
                                    {"sweep": sweep.model_dump(mode="json")},
                                    {"stage": stage.name, "metric": sweep.metric, "mode": sweep.mode, "init_from": init_uri,
                                     "recipe": cfg.name})
    context = {"stage": stage.model_dump(mode="json"), "tracking_uri": tracking_uri, "sweep_run_id": sweep_run,
               "pipeline_id": pipeline_id, "init_uri": init_uri, "tokenizer_uri": tokenizer_uri,
               "train_path": data.train_path, "heldout_path": data.heldout_path, "eval_suite": eval_suite,
               "eval_every": sweep.eval_every, "train_storage": f"{root}/trials"}
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=sweep.evaluations, grace_period=1,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    space = {key: tune.grid_search(values) for key, values in sweep.space.items()}
    tuner = tune.Tuner(
        # the trial function itself holds nothing: its Ray Train workers hold the stage's CPUs / GPUs
        tune.with_resources(tune.with_parameters(run_trial, ctx=context), {"CPU": 0, "memory": 2**20}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"sweep-{stage.name}-{stamp}", storage_path=root, verbose=1),
    )
    try:
        results = tuner.fit()
        trials = trial_table(results, sweep)
        complete = [t for t in trials if t["complete"] and t["value"] is not None]
        if not complete:
            raise RuntimeError(f"sweep of {stage.name}: no trial finished its {sweep.steps} steps with {sweep.metric}: "
                               + "; ".join(str(r.error) for r in results if r.error))
        # the best among trials that ran every step (one ASHA stopped was worse at its rung than a survivor)
        best = (min if sweep.mode == "min" else max)(complete, key=lambda t: t["value"])
        best_values, value, best_run = best["candidate"], float(best["value"]), best["run_id"]
        close_trial_runs(tracker, trials)
        tracker.set_tags(sweep_run, {"best_trial_run": best_run, **{f"best.{k}": str(v) for k, v in best_values.items()}})
        tracker.log_metrics(sweep_run, {"best_value": value, "trials": len(trials),
                                        "trials_stopped_early": sum(t["stopped_early"] for t in trials)})
        tracker.log_json(sweep_run, {"best": best_values, "best_value": value, "trials": trials}, "sweep.json")
    except BaseException:
        tracker.end_stage(sweep_run, "FAILED")
        raise
    tracker.end_stage(sweep_run, "FINISHED")
    print(format_trials(trials, sweep.metric), flush=True)
    print(f"[raylong] best {sweep.metric}={value:.4f} with {best_values} (trial run {best_run}; sweep run {sweep_run})",
          flush=True)
    if write:
        if recipe_path is None:
            raise ValueError("--write needs the recipe path")
        write_best(recipe_path, index, best_values)
        print(f"[raylong] wrote {best_values} into stages[{index}] of {recipe_path}", flush=True)
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


def close_trial_runs(tracker: Tracker, trials: list[dict]) -> None:
    """Settle each trial's MLflow status from what Tune saw. A trial the scheduler stops ends with its Tune actor,
    so its run may say RUNNING, or FAILED if the stop interrupted training: it is KILLED with `stopped_early`."""
    for t in trials:
        if t["run_id"] is None:
            continue
        if t["complete"]:
            tracker.end_stage(t["run_id"], "FINISHED")
        elif t["stopped_early"]:
            tracker.client.set_tag(t["run_id"], "stopped_early", "scheduler")
            tracker.end_stage(t["run_id"], "KILLED")
        else:
            tracker.end_stage(t["run_id"], "FAILED")


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

