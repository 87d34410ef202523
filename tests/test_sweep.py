"""`raylong sweep` on the tiny recipe's first stage: Ray Tune runs its 4 candidates (RoPE base x lr) as Ray
Train jobs at SP=2 with ASHA on the held-out loss; every trial is a nested MLflow run under the sweep run;
the reported best is the trial with the best final eval metric in MLflow; --write puts it in the recipe."""

from __future__ import annotations

import shutil

import pytest

from raylong.config import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    from raylong.pipeline.sweep import run_sweep
    from raylong.tracking import Tracker

    tmp = tmp_path_factory.mktemp("sweep")
    recipe = tmp / "tiny.yaml"
    shutil.copy("jobs/recipes/tiny.yaml", recipe)
    cfg = load_recipe(recipe, {"storage_path": str(tmp / "runs")})  # from the recipe's pretrained tiny base
    cfg.stages[0].data.token_budget = 40000
    tracking_uri = f"sqlite:///{tmp}/runs/mlflow.db"  # explicit: an earlier test's driver may have set the env
    result = run_sweep(cfg, "cp_2k", pipeline_id="sweep-test", tracking_uri=tracking_uri, recipe_path=str(recipe),
                       write=True)
    return {"result": result, "tracker": Tracker(tracking_uri), "recipe": recipe,
            "space": cfg.stages[0].sweep.space}


def final_metric(tracker, run_id: str, key: str, steps: int) -> float | None:
    history = {m.step: m.value for m in tracker.client.get_metric_history(run_id, key)}
    return history.get(steps)


def test_every_candidate_is_a_nested_trial_run(sweep):
    tracker, result = sweep["tracker"], sweep["result"]
    trials = tracker.stage_runs(sweep["result"].sweep_run_id)
    assert len(trials) == len(result.trials) == 4
    candidates = {(float(r.tags["candidate.rope.theta"]), float(r.tags["candidate.optim.lr"])) for r in trials}
    assert candidates == {(t, lr) for t in sweep["space"]["rope.theta"] for lr in sweep["space"]["optim.lr"]}
    for r in trials:
        assert r.tags["kind"] == "trial" and r.status in ("FINISHED", "KILLED")
        params = tracker.client.get_run(r.run_id).data.params
        assert float(params["rope.theta"]) == float(r.tags["candidate.rope.theta"])  # the trial ran that candidate
        assert float(params["optim.lr"]) == float(r.tags["candidate.optim.lr"])
        assert tracker.metric_history(r.run_id, "eval/heldout_loss"), "every trial is evaluated at least once"
        assert tracker.metric_history(r.run_id, "train/loss")
    sweep_run = tracker.client.get_run(result.sweep_run_id)
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["kind"] == "sweep"


def test_reported_best_is_the_best_final_eval_in_mlflow(sweep):
    tracker, result = sweep["tracker"], sweep["result"]
    steps = 4
    finals = {}
    for r in tracker.stage_runs(result.sweep_run_id):
        value = final_metric(tracker, r.run_id, "eval/heldout_loss", steps)
        if value is not None and "stopped_early" not in r.tags:
            finals[r.run_id] = value
    assert finals, "no trial completed"
    best_run = min(finals, key=finals.get)
    assert result.best_trial_run_id == best_run
    assert result.best_value == pytest.approx(finals[best_run], rel=1e-9)
    tags = tracker.client.get_run(result.sweep_run_id).data.tags
    best_tags = tracker.client.get_run(best_run).data.tags
    assert tags["best_trial_run"] == best_run
    assert float(tags["best.rope.theta"]) == float(best_tags["candidate.rope.theta"])
    assert float(tags["best.optim.lr"]) == float(best_tags["candidate.optim.lr"])
    stopped = [r for r in tracker.stage_runs(result.sweep_run_id) if "stopped_early" in r.tags]
    print(f"[figure] sweep: {len(result.trials)} trials, {len(stopped)} stopped early by ASHA, best {result.best} "
          f"heldout_loss {result.best_value:.4f}; final losses {sorted(finals.values())}")


def test_write_puts_the_best_into_the_recipe_keeping_comments(sweep):
    result, recipe = sweep["result"], sweep["recipe"]
    text = recipe.read_text()
    assert "# `raylong sweep jobs/recipes/tiny.yaml --stage cp_2k`" in text  # comments survive
    cfg = load_recipe(recipe)
    assert cfg.stages[0].rope.theta == pytest.approx(result.best["rope.theta"])
    assert cfg.stages[0].optim.lr == pytest.approx(result.best["optim.lr"])
    assert cfg.stages[1].rope == load_recipe("jobs/recipes/tiny.yaml").stages[1].rope  # other stages untouched
