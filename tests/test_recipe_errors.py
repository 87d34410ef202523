"""Forty kinds of broken recipe: each is refused with an error naming the field, by `raylong validate`
and by `raylong run`, before any Ray resource is requested and before anything is written to storage."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from raylong.cli import main
from tests.conftest import STDLIB, TINY_LLAMA

LLAMA_8B_SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256}


def base_recipe(tokenizer_dir: str, storage: str) -> dict:
    stage = {
        "name": "cp_1k", "kind": "pretrain", "seq_len": 1024,
        "data": {"sources": [{"name": "code", "path": f"{STDLIB}/json/*.py", "format": "text"}], "token_budget": 4000},
        "optim": {"lr": 1e-3, "steps": 4},
        "parallel": {"num_workers": 2, "sp_size": 2, "cpus_per_worker": 0.5},
    }
    return {"name": "broken", "storage_path": storage, "model": {"init": dict(TINY_LLAMA)},
            "tokenizer": {"path": tokenizer_dir}, "stages": [stage]}


def _stage(r, i=0):
    return r["stages"][i]


def _second_stage(r, **changes):
    s = copy.deepcopy(r["stages"][0])
    s.update(changes)
    r["stages"].append(s)


# name: (mutation of the valid recipe, fragments the error must contain)
CASES = {
    "seq_len_not_divisible_by_sp": (lambda r: _stage(r).update(seq_len=1025),
                                    ["stages[0]", "seq_len must be divisible by parallel.sp_size", "1025 % 2 != 0"]),
    "heads_not_divisible_by_sp": (lambda r: _stage(r)["parallel"].update(num_workers=8, sp_size=8),
                                  ["num_attention_heads must be divisible by parallel.sp_size", "4 % 8 != 0"]),
    "more_sp_ranks_than_workers": (lambda r: _stage(r)["parallel"].update(sp_size=4),
                                   ["stages[0].parallel", "sp_size=4 needs at least that many ranks", "num_workers=2"]),
    "workers_not_multiple_of_sp": (lambda r: _stage(r)["parallel"].update(num_workers=3),
                                   ["parallel.num_workers must be a multiple of parallel.sp_size", "3 % 2"]),
    "unknown_init_from": (lambda r: _stage(r).update(init_from="cp_0k"),
                          ["stages[0].init_from='cp_0k' must name an earlier stage"]),
    "missing_data_path": (lambda r: _stage(r)["data"]["sources"][0].update(path="/nonexistent/corpus/*.jsonl"),
                          ["stages[0].data.sources[0].path", "no files match '/nonexistent/corpus/*.jsonl'"]),
    "missing_data_file": (lambda r: _stage(r)["data"]["sources"][0].update(path="/nonexistent/corpus.jsonl"),
                          ["stages[0].data.sources[0].path", "does not exist: /nonexistent/corpus.jsonl"]),
    "negative_lr": (lambda r: _stage(r)["optim"].update(lr=-1e-4),
                    ["stages[0].optim.lr", "greater than 0", "-0.0001"]),
    "unknown_rope_type": (lambda r: _stage(r).update(rope={"type": "ntk"}),
                          ["stages[0].rope.type", "'default', 'yarn' or 'llama3'", "'ntk'"]),
    "yarn_without_factor": (lambda r: _stage(r).update(rope={"type": "yarn"}),
                            ["stages[0].rope", "needs rope.factor and rope.original_max_position_embeddings"]),
    "duplicate_stage_names": (lambda r: _second_stage(r),
                              ["stages[1].name 'cp_1k' is used twice"]),
    "typo_in_a_key": (lambda r: _stage(r)["optim"].update(learning_rate=1e-4),
                      ["stages[0].optim.learning_rate", "Extra inputs are not permitted"]),
    "zero_steps": (lambda r: _stage(r)["optim"].update(steps=0), ["stages[0].optim.steps", "greater than or equal to 1"]),
    "warmup_not_below_steps": (lambda r: _stage(r)["optim"].update(warmup_steps=4),
                               ["stages[0].optim", "warmup_steps must be smaller than optim.steps (4 >= 4)"]),
    "zero_grad_accum": (lambda r: _stage(r)["optim"].update(grad_accum=0), ["stages[0].optim.grad_accum"]),
    "beta_of_one": (lambda r: _stage(r)["optim"].update(betas=[0.9, 1.0]), ["stages[0].optim", "optim.betas"]),
    "heldout_fraction_too_large": (lambda r: _stage(r)["data"].update(heldout_fraction=0.6),
                                   ["stages[0].data.heldout_fraction", "less than 0.5"]),
    "error_budget_above_one": (lambda r: _stage(r)["data"].update(error_budget=2),
                               ["stages[0].data.error_budget", "less than or equal to 1"]),
    "zero_source_weight": (lambda r: _stage(r)["data"]["sources"][0].update(weight=0),
                           ["stages[0].data.sources[0].weight", "greater than 0"]),
    "unknown_source_format": (lambda r: _stage(r)["data"]["sources"][0].update(format="csv"),
                              ["stages[0].data.sources[0].format", "'csv'"]),
    "no_sources": (lambda r: _stage(r)["data"].update(sources=[]), ["stages[0].data.sources", "at least 1"]),
    "zero_stage_4": (lambda r: _stage(r)["parallel"].update(zero_stage=4), ["stages[0].parallel.zero_stage", "1, 2 or 3"]),
    "param_offload_without_zero3": (lambda r: (_stage(r)["parallel"].update(zero_stage=2),
                                               _stage(r).update(memory={"offload_params": True})),
                                    ["memory.offload_params needs parallel.zero_stage: 3"]),
    "checkpoint_offload_without_checkpointing": (lambda r: _stage(r).update(memory={"offload_checkpoints": True}),
                                                 ["stages[0].memory", "offload_checkpoints needs memory.activation_checkpointing"]),
    "carry_optimizer_on_first_stage": (lambda r: _stage(r)["optim"].update(carry_optimizer_state=True),
                                       ["stages[0].optim.carry_optimizer_state: the first stage has no previous optimizer state"]),
    "eval_length_beyond_seq_len": (lambda r: _stage(r).update(eval={"lengths": [4096]}),
                                   ["stages[0]", "eval.lengths [4096] exceed seq_len 1024"]),
    "eval_depth_outside_0_1": (lambda r: _stage(r).update(eval={"depths": [1.5]}),
                               ["stages[0].eval.depths", "fractions in [0, 1]"]),
    "missing_eval_filler": (lambda r: _stage(r).update(eval={"filler": "/nonexistent/*.txt"}),
                            ["stages[0].eval.filler: no files match '/nonexistent/*.txt'"]),
    "sft_trains_the_task_it_is_scored_on": (lambda r: _second_stage(
        r, name="sft_1k", kind="sft", eval={"filler": f"{STDLIB}/json/*.py"},
        data={"sources": [{"name": "pk", "format": "jsonl", "generate": {
            "task": "passkey", "num_examples": 4, "filler": f"{STDLIB}/json/*.py", "context_tokens": [60]}}]}),
        ["stages[1].data.sources[0].generate.task 'passkey' is a task the chain evaluates",
         "the evaluation would score the format trained on"]),
    "unknown_stage_kind": (lambda r: _stage(r).update(kind="dpo"), ["stages[0].kind", "'pretrain' or 'sft'", "'dpo'"]),
    "stage_name_with_space": (lambda r: _stage(r).update(name="cp 1k"), ["stages[0].name", "should match pattern"]),
    "no_stages": (lambda r: r.update(stages=[]), ["stages: List should have at least 1 item"]),
    "model_path_and_init": (lambda r: r["model"].update(path="/models/llama"),
                            ["model: set exactly one of model.path (pretrained) or model.init"]),
    "missing_model_dir": (lambda r: r.update(model={"path": "/nonexistent/llama-3.1-8b"}),
                          ["model.path: no directory at /nonexistent/llama-3.1-8b"]),
    "missing_tokenizer_dir": (lambda r: r.update(tokenizer={"path": "./nonexistent-tokenizer"}),
                              ["tokenizer.path: no directory at ./nonexistent-tokenizer"]),
    "credentials_in_storage_uri": (lambda r: r.update(storage_path="s3://AKIAEXAMPLE:hunter2secret@bucket/runs"),
                                   ["storage_path carries credentials in the URI", "s3://***@bucket/runs"]),
    "remote_storage_without_tracking_server": (lambda r: r.update(storage_path="s3://bucket/runs"),
                                               ["storage_path s3://bucket/runs is remote: set MLFLOW_TRACKING_URI"]),
    "sweep_over_a_field_that_does_not_exist": (lambda r: _stage(r).update(sweep={"space": {"rope.thetta": [1e4]}}),
                                               ["stages[0]", "sweep.space key 'rope.thetta' is not a stage field"]),
    "sweep_candidate_that_breaks_the_stage": (lambda r: _stage(r).update(sweep={"space": {"optim.lr": [1e-3, -1.0]}}),
                                              ["stages[0]", "sweep.space optim.lr=-1.0 makes an invalid stage",
                                               "greater than 0"]),
    "sweep_evaluating_after_the_last_step": (lambda r: _stage(r).update(
        sweep={"space": {"optim.lr": [1e-3]}, "steps": 2, "eval_every": 3}),
        ["stages[0].sweep", "sweep.eval_every must be <= sweep.steps (3 > 2)"]),
    "gpu_stage_that_does_not_fit": (lambda r: (r["model"].update(init=LLAMA_8B_SHAPE),
                                               _stage(r).update(seq_len=1048576),
                                               _stage(r)["parallel"].update(use_gpu=True)),
                                    ["stages[0].parallel: stage 'cp_1k' does not fit", "GB per GPU needed", "--ignore-plan"]),
}


@pytest.fixture(scope="module")
def broken_recipes(tokenizer_dir, tmp_path_factory) -> dict[str, tuple[str, str, list[str]]]:
    """{case: (recipe file, its storage path, fragments)}; each storage path must never be created."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, (mutate, fragments) in CASES.items():
        storage = str(root / f"runs-{name}")
        raw = base_recipe(tokenizer_dir, storage)
        mutate(raw)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        out[name] = (str(path), raw["storage_path"], fragments)
    not_yaml = root / "not_a_mapping.yaml"
    not_yaml.write_text("- just\n- a list\n")
    out["not_a_mapping"] = (str(not_yaml), str(root / "unused"), ["expected a mapping at the top level, got list"])
    return out


def test_there_are_at_least_twenty_kinds(broken_recipes):
    assert len(broken_recipes) >= 20


def test_the_valid_base_recipe_passes(tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tokenizer_dir, str(tmp_path / "runs"))))
    assert main(["validate", str(path)]) == 0
    assert "valid (1 stages)" in capsys.readouterr().out


def test_validate_names_the_field_of_every_broken_recipe(broken_recipes, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, (path, _, fragments) in broken_recipes.items():
        assert main(["validate", path]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("raylong: error: "), (name, err)
        for fragment in fragments:
            assert fragment in err, f"{name}: {fragment!r} not in {err!r}"
        assert "hunter2secret" not in err


RUN_ALL = r"""
import contextlib, io, json, os, sys, time
from raylong.cli import main
import ray
out = []
for name, path, storage in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(["run", "--recipe", path])
    out.append({"name": name, "rc": rc, "err": err.getvalue(), "seconds": time.perf_counter() - t0,
                "ray_initialized": ray.is_initialized(), "storage_created": os.path.exists(storage)})
print(json.dumps(out))
"""


def test_run_refuses_each_before_asking_ray_for_anything(broken_recipes, tmp_path):
    """One fresh process runs `raylong run` on every broken recipe: same message as validate, exit 2, Ray never
    initialised, the storage path never created."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    cases = [(name, path, storage.removeprefix("file://")) for name, (path, storage, _) in broken_recipes.items()]
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(broken_recipes)
    for r in results:
        fragments = broken_recipes[r["name"]][2]
        assert r["rc"] == 2, r
        assert all(f in r["err"] for f in fragments), r
        assert not r["ray_initialized"], f"{r['name']}: Ray was initialised before the error"
        assert not r["storage_created"], f"{r['name']}: something was written to storage"
    slowest = max(results, key=lambda r: r["seconds"])
    print(f"[figure] {len(results)} broken recipes refused by `raylong run` before Ray; "
          f"slowest {slowest['name']} in {slowest['seconds']:.2f}s")
