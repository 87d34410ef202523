"""Every check a recipe can fail without a cluster, run before any Ray resource is requested.

`raylong validate <recipe>` and `raylong run` run the same checks: the typed schema (raylong/config.py),
then, here, what needs the filesystem or the model config: the memory plan of every GPU stage, the
model's attention heads against every stage's SP degree, the model / tokenizer / data / filler paths,
and where MLflow will record the run.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from raylong.config import PipelineConfig, RecipeError, check_heads_divisible, expand_path, load_recipe

_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")  # org/name: resolved by transformers on the cluster


def check_pretrained_path(path: str, field: str, needs: str) -> None:
    """A local directory or URI must exist and hold `needs`; a hub id (org/name) is left to transformers."""
    from raylong.storage import exists

    if "://" in path:
        if not exists(f"{path.rstrip('/')}/{needs}"):
            raise RecipeError(f"{field}: no {needs} at {path}")
        return
    local = expand_path(path)
    if os.path.isdir(local):
        if not os.path.exists(os.path.join(local, needs)):
            raise RecipeError(f"{field}: {local} has no {needs}")
        return
    if _HUB_ID.match(path) and not path.startswith("."):
        return
    raise RecipeError(f"{field}: no directory at {local}")


def check_glob(pattern: str, field: str) -> None:
    if not glob.glob(expand_path(pattern)):
        raise RecipeError(f"{field}: no files match {pattern!r}")


def check_data_sources(cfg: PipelineConfig) -> None:
    from raylong.data.sources import resolve_files

    for i, stage in enumerate(cfg.stages):
        for j, src in enumerate(stage.data.sources):
            field = f"stages[{i}].data.sources[{j}]"
            if src.generate is not None:
                check_glob(src.generate.filler, f"{field}.generate.filler")
                continue
            try:
                files = resolve_files(src.path, src.format)
            except FileNotFoundError as exc:
                raise RecipeError(f"{field}.path ({stage.name}/{src.name}): {exc}") from None
            if not files:
                raise RecipeError(f"{field}.path ({stage.name}/{src.name}): no files match {src.path!r}")
        if stage.eval.enabled and stage.eval.filler:
            check_glob(stage.eval.filler, f"stages[{i}].eval.filler")


def check_tracking(cfg: PipelineConfig) -> None:
    """The rule default_tracking_uri applies, checked without creating anything."""
    from raylong.tracking import tracking_location_problem

    problem = tracking_location_problem(cfg.storage_path)
    if problem:
        raise RecipeError(problem)


def preflight(cfg: PipelineConfig, check_plan: bool = True) -> None:
    """All cluster-free checks, cheapest first. Raises RecipeError (or PlanError) naming the field."""
    from raylong.plan import check_pipeline_fits, stage_model_shape

    if cfg.model.path is not None:
        check_pretrained_path(cfg.model.path, "model.path", "config.json")
    if cfg.tokenizer.path is not None:
        check_pretrained_path(cfg.tokenizer.path, "tokenizer.path", "tokenizer_config.json")
    elif cfg.tokenizer.train is not None:
        check_glob(cfg.tokenizer.train.files, "tokenizer.train.files")
    check_tracking(cfg)
    check_heads_divisible(cfg, stage_model_shape(cfg).heads)
    if check_plan:
        check_pipeline_fits(cfg)
    check_data_sources(cfg)


def validate_recipe(path: str | Path, overrides: dict[str, Any] | None = None, check_plan: bool = True) -> PipelineConfig:
    """load_recipe + preflight: what `raylong validate` runs."""
    cfg = load_recipe(path, overrides)
    preflight(cfg, check_plan)
    return cfg
