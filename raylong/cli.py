"""`raylong run | plan | sweep | report | compare | validate` (`ray job submit` runs jobs/pipeline.py = `run`)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raylong", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a pipeline from a recipe")
    run.add_argument("--recipe", required=True)
    run.add_argument("--pipeline-id", default=None, help="rerun an id to skip its finished stages")
    run.add_argument("--storage-path", default=None, help="override the recipe's storage_path")
    run.add_argument("--ignore-plan", action="store_true", help="run GPU stages the memory planner rejects")
    plan = sub.add_parser("plan", help="per-stage GPU memory, verdict, smallest SP that fits, step time")
    plan.add_argument("recipe")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for step time")
    for name, text in (("report", "per-stage table of a pipeline, read back from MLflow"),
                       ("compare", "stage table + comparison figures, logged to the pipeline's parent run")):
        rep = sub.add_parser(name, help=text)
        rep.add_argument("pipeline_id")
        rep.add_argument("--storage-path", default="./runs", help="where the default SQLite MLflow store lives")
    sw = sub.add_parser("sweep", help="Ray Tune search over a stage's sweep.space (RoPE, lr), trials in MLflow")
    sw.add_argument("recipe")
    sw.add_argument("--stage", required=True)
    sw.add_argument("--pipeline-id", default=None, help="take the start weights (and data cache) of this pipeline")
    sw.add_argument("--storage-path", default=None, help="override the recipe's storage_path")
    sw.add_argument("--write", action="store_true", help="write the best values back into the recipe")
    val = sub.add_parser("validate", help="every check `run` makes before it asks Ray for anything")
    val.add_argument("recipe")
    val.add_argument("--ignore-plan", action="store_true", help="skip the GPU memory plan")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from raylong.config import RecipeError
    from raylong.plan import PlanError

    try:
        return _dispatch(args)
    except (RecipeError, PlanError, FileNotFoundError) as exc:  # bad input: the message, not a traceback
        print(f"raylong: error: {exc}", file=sys.stderr, flush=True)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from raylong.config import load_recipe
    from raylong.credentials import redact

    if args.command == "validate":
        from raylong.pipeline.preflight import validate_recipe

        cfg = validate_recipe(args.recipe, check_plan=not args.ignore_plan)
        for s in cfg.stages:
            print(f"{s.name}: {s.kind} seq_len={s.seq_len} SP={s.parallel.sp_size} x DP={s.data_parallel_size} "
                  f"ZeRO-{s.parallel.zero_stage} steps={s.optim.steps} tokens/step={s.tokens_per_step}")
        from raylong.plan import sp_span_warnings

        for warning in sp_span_warnings(cfg):
            print(f"warning: {warning}")
        print(f"{args.recipe}: valid ({len(cfg.stages)} stages)")
        return 0
    if args.command == "sweep":
        from raylong.pipeline.sweep import run_sweep

        cfg = load_recipe(args.recipe, {"storage_path": args.storage_path} if args.storage_path else None)
        run_sweep(cfg, args.stage, args.pipeline_id, recipe_path=args.recipe, write=args.write)
        return 0
    if args.command == "plan":
        from raylong.plan import format_plans

        print(format_plans(load_recipe(args.recipe), args.mfu))
        return 0
    if args.command == "run":
        from raylong.pipeline.runner import run_pipeline

        overrides = {"storage_path": args.storage_path} if args.storage_path else None
        cfg = load_recipe(args.recipe, overrides)
        result = run_pipeline(cfg, args.pipeline_id, check_plan=not args.ignore_plan)
        print(f"\npipeline {result.pipeline_id} finished; MLflow: {redact(result.tracking_uri)}", flush=True)
        return 0
    if args.command in ("report", "compare"):
        from raylong.pipeline.report import compare_pipeline, format_table, stage_rows
        from raylong.storage import absolute
        from raylong.tracking import Tracker, default_tracking_uri

        tracker = Tracker(default_tracking_uri(absolute(args.storage_path)))
        if args.command == "compare":
            compare_pipeline(tracker, args.pipeline_id)
        else:
            print(format_table(stage_rows(tracker, args.pipeline_id)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
