"""The memory planner against ALST's published maxima (Llama-3.1-8B, bf16, ZeRO-3, micro-batch 1), and
the pipeline's refusal of a stage that does not fit."""

from __future__ import annotations

import pytest
import yaml

from raylong.config import MemoryConfig, PipelineConfig, load_recipe
from raylong.plan import LLAMA_31_8B, PlanError, check_pipeline_fits, format_plans, max_tokens

BASELINE = MemoryConfig(activation_checkpointing=True, offload_optimizer=True)
ULYSSES = BASELINE.model_copy(update={"tiled_loss": True})  # ALST's ablation is cumulative: Ulysses row has tiled loss
ALL = ULYSSES.model_copy(update={"tiled_mlp": True, "offload_checkpoints": True})
ALL_PARAMS_OFFLOAD = ALL.model_copy(update={"offload_params": True})

# (case, gpus, sp, memory switches, gpu, published max tokens)
PUBLISHED = [
    ("1xH100 baseline", 1, 1, BASELINE, "H100-80GB", 34_000),  # 32-36K
    ("1xH100 all ALST features", 1, 1, ALL, "H100-80GB", 500_000),
    ("8xH100 Ulysses", 8, 8, ULYSSES, "H100-80GB", 1_100_000),
    ("8xH100 all ALST features", 8, 8, ALL, "H100-80GB", 3_700_000),
    ("32xH100 all ALST features", 32, 32, ALL, "H100-80GB", 15_000_000),
    ("1xH200 all + offload", 1, 1, ALL_PARAMS_OFFLOAD, "H200-141GB", 1_200_000),
]


@pytest.mark.parametrize("case,gpus,sp,mem,gpu,published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_predicted_max_length_within_25_percent_of_published(case, gpus, sp, mem, gpu, published):
    predicted = max_tokens(LLAMA_31_8B, gpus, sp, mem, gpu)
    assert abs(predicted - published) / published <= 0.25, f"{case}: predicted {predicted}, published {published}"


def test_each_switch_lowers_memory_per_token():
    steps = [MemoryConfig(), BASELINE, ULYSSES, ULYSSES.model_copy(update={"tiled_mlp": True}), ALL]
    lengths = [max_tokens(LLAMA_31_8B, 8, 8, m, "H100-80GB") for m in steps]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)


def test_seed_recipe_fits_its_cluster_and_plan_prints_every_stage():
    cfg = load_recipe("jobs/recipes/llama31_8b_1m.yaml")
    assert len(check_pipeline_fits(cfg)) == 6
    text = format_plans(cfg)
    for stage in cfg.stages:
        assert f"{stage.name}: {stage.seq_len} tokens" in text
    assert text.count("-> fits") == 6


def test_sp_groups_larger_than_a_node_are_named_by_plan(capsys):
    from raylong.cli import main

    cfg = load_recipe("jobs/recipes/llama31_8b_1m.yaml")
    spanning = [s.name for s in cfg.stages if s.parallel.sp_size > 8]
    assert spanning == ["cp_1m", "sft_1m"]  # SP 16 on nodes of 8 GPUs
    assert main(["plan", "jobs/recipes/llama31_8b_1m.yaml"]) == 0  # `validate` and `run` say the same
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert [w.split("'")[1] for w in warnings] == spanning, warnings
    assert "an SP group of 16 GPUs spans 2 nodes of 8 (parallel.gpus_per_node)" in warnings[0]
    # on nodes of 16 GPUs nothing spans
    with open("jobs/recipes/llama31_8b_1m.yaml") as f:
        raw = yaml.safe_load(f)
    for stage in raw["stages"]:
        stage["parallel"]["gpus_per_node"] = 16
    assert "warning:" not in format_plans(PipelineConfig.model_validate(raw))


def test_stage_that_does_not_fit_is_refused_with_the_fix():
    with open("jobs/recipes/llama31_8b_1m.yaml") as f:
        raw = yaml.safe_load(f)
    raw["stages"][2]["memory"] = {"activation_checkpointing": True}  # 1M tokens, no tiling, no offload
    cfg = PipelineConfig.model_validate(raw)
    with pytest.raises(PlanError) as info:
        check_pipeline_fits(cfg)
    msg = str(info.value)
    assert "stage 'cp_1m' does not fit" in msg and "80 GB on H100-80GB" in msg
    assert "turn on memory.tiled_loss" in msg and "--ignore-plan" in msg


def test_pipeline_refuses_before_anything_starts(tmp_path):
    from raylong.pipeline.runner import run_pipeline

    with open("jobs/recipes/llama31_8b_1m.yaml") as f:
        raw = yaml.safe_load(f)
    raw["storage_path"] = str(tmp_path / "runs")
    raw["stages"][5]["memory"] = {}
    cfg = PipelineConfig.model_validate(raw)
    with pytest.raises(PlanError, match="stage 'sft_1m' does not fit"):
        run_pipeline(cfg, pipeline_id="refused")
    assert not (tmp_path / "runs").exists()  # no MLflow store, no data, no cluster resources
