"""Recipes load; bad configuration is refused with a message naming the field and the rule."""

from __future__ import annotations


import pytest
import yaml
from pydantic import ValidationError

from raylong.config import PipelineConfig, load_recipe

RECIPES = ["jobs/recipes/tiny.yaml", "jobs/recipes/llama31_8b_1m.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_load_with_six_stages_in_order(path):
    cfg = load_recipe(path)
    kinds = [s.kind for s in cfg.stages]
    assert kinds == ["pretrain"] * 3 + ["sft"] * 3
    cp, sft = [s.seq_len for s in cfg.stages[:3]], [s.seq_len for s in cfg.stages[3:]]
    assert cp == sorted(cp) and sft == sorted(sft)
    for s in cfg.stages:
        assert s.seq_len % s.parallel.sp_size == 0


def test_real_recipe_stage_lengths():
    cfg = load_recipe("jobs/recipes/llama31_8b_1m.yaml")
    assert [s.seq_len for s in cfg.stages] == [262144, 524288, 1048576, 32768, 262144, 1048576]


def tiny_raw() -> dict:
    with open("jobs/recipes/tiny.yaml") as f:
        return yaml.safe_load(f)


def expect_error(raw: dict, *fragments: str) -> str:
    with pytest.raises(ValidationError) as info:
        PipelineConfig.model_validate(raw)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in: {text}"
    return text


def test_seq_len_not_divisible_by_sp_names_the_numbers():
    raw = tiny_raw()
    raw["stages"][1]["seq_len"] = 4097
    expect_error(raw, "stages.1", "seq_len must be divisible by parallel.sp_size", "4097 % 2 != 0")


def test_heads_not_divisible_by_sp():
    raw = tiny_raw()  # a random init: checked when the recipe is validated (a model.path, by preflight)
    raw["model"] = {"init": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}}
    raw["stages"][0]["parallel"].update(sp_size=3, num_workers=3)
    raw["stages"][0]["seq_len"] = 3072
    raw["stages"][0]["eval"] = {"short_len": 240}
    expect_error(raw, "num_attention_heads must be divisible by parallel.sp_size", "4 % 3 != 0")


def test_eval_window_must_fit_the_stage():
    raw = tiny_raw()
    raw["stages"][3]["eval"] = {"short_len": 512}
    expect_error(raw, "eval.short_len must be <= seq_len and divisible by sp_size", "short_len=512, seq_len=256")
    raw = tiny_raw()
    raw["stages"][0]["eval"] = {"lengths": [1024, 4096]}
    expect_error(raw, "eval.lengths [4096] exceed seq_len 2048")


def test_checkpoint_offload_needs_checkpointing():
    raw = tiny_raw()
    raw["stages"][0]["memory"] = {"offload_checkpoints": True}
    expect_error(raw, "memory.offload_checkpoints needs memory.activation_checkpointing: true")


def test_workers_not_multiple_of_sp():
    raw = tiny_raw()
    raw["stages"][2]["parallel"].update(num_workers=3)
    expect_error(raw, "num_workers must be a multiple of parallel.sp_size", "3 % 2 != 0")


def test_init_from_must_name_an_earlier_stage():
    raw = tiny_raw()
    raw["stages"][1]["init_from"] = "sft_8k"
    expect_error(raw, "stages[1].init_from='sft_8k' must name an earlier stage", "cp_2k")


def test_typo_in_a_key_is_refused():
    raw = tiny_raw()
    raw["stages"][0]["optim"]["learning_rate"] = 1e-3
    expect_error(raw, "learning_rate", "Extra inputs are not permitted")


def test_yarn_needs_factor_and_original_length():
    raw = tiny_raw()
    raw["stages"][0]["rope"] = {"type": "yarn", "theta": 5e5}
    expect_error(raw, "rope.type='yarn' needs rope.factor and rope.original_max_position_embeddings")


def test_zero_stage_outside_offered_set():
    raw = tiny_raw()
    raw["stages"][0]["parallel"]["zero_stage"] = 0
    expect_error(raw, "zero_stage", "Input should be 1, 2 or 3")


def test_duplicate_stage_names():
    raw = tiny_raw()
    raw["stages"][1]["name"] = "cp_2k"
    expect_error(raw, "'cp_2k' is used twice")


def test_default_init_from_is_previous_stage():
    cfg = load_recipe("jobs/recipes/tiny.yaml")
    assert cfg.init_stage_of(0) is None
    assert [cfg.init_stage_of(i) for i in range(1, 6)] == [s.name for s in cfg.stages[:5]]


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_rope_to_hf_variants():
    cfg = load_recipe("jobs/recipes/tiny.yaml")
    assert cfg.stages[0].rope.to_hf() == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                          "original_max_position_embeddings": 1024}
    from raylong.config import RopeConfig

    assert RopeConfig(theta=5e4).to_hf() == {"rope_type": "default", "rope_theta": 5e4}

    y = RopeConfig(type="yarn", theta=5e5, factor=8, original_max_position_embeddings=131072).to_hf()
    assert y == {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 131072}


def test_carrying_optimizer_state_needs_the_same_worker_layout():
    raw = tiny_raw()
    raw["stages"][1]["optim"]["carry_optimizer_state"] = True
    PipelineConfig.model_validate(raw)  # same 2 workers, ZeRO-3: allowed
    raw["stages"][1]["parallel"]["num_workers"] = 4
    expect_error(raw, "carry_optimizer_state needs the same parallel.num_workers and zero_stage", "(4, 3) != (2, 3)")
    raw = tiny_raw()
    raw["stages"][0]["optim"]["carry_optimizer_state"] = True
    expect_error(raw, "the first stage has no previous optimizer state")


def test_the_base_model_is_scored_by_the_longest_evaluated_stage_with_its_own_rope():
    """The 'base' run: the seed recipe's last 1M-token stage's tasks, lengths and workers, plain prompts, and
    the RoPE the base's config.json states (Llama-3.1's llama3 scaling, written the v4 way), not the stage's."""
    from raylong.pipeline.runner import base_eval_stage
    from raylong.train.model import rope_of

    cfg = load_recipe("jobs/recipes/llama31_8b_1m.yaml")
    llama31 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    stage = base_eval_stage(cfg, llama31)
    last = cfg.stages[-1]
    assert (stage.name, stage.kind, stage.seq_len, stage.eval, stage.parallel) == ("base", "pretrain", 1048576,
                                                                                   last.eval, last.parallel)
    assert stage.rope.to_hf() == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0}
    assert last.rope.type == "yarn"  # the stage's own RoPE is left as it was
    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert rope_of(v5).to_hf() == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type 'dynamic' in the model's config.json is not one a stage can state"):
        rope_of({"rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValidationError, match="'base' is the base model's evaluation run"):
        PipelineConfig.model_validate({**cfg.model_dump(), "stages": [{**cfg.stages[-1].model_dump(), "name": "base"}]})
    for s in cfg.stages:
        s.eval.enabled = False
    assert base_eval_stage(cfg, v5) is None
