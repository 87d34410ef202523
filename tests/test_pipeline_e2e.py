"""A two-stage chain (pretrain -> SFT) through real Ray Data, Ray Train (2 workers, SP=2, ZeRO-3) and
MLflow, with storage addressed as a file:// URI (the object-store code path); the first attempt fails at
the SFT stage's bad data, the rerun of the same pipeline id skips the finished pretraining stage and
completes, evaluates each stage, compares them and registers the final export."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raylong.config import PipelineConfig
from tests.conftest import STDLIB, TINY_LLAMA

pytestmark = pytest.mark.slow


def two_stage_recipe(tmp_path, tokenizer_dir: str, sft_file: str) -> PipelineConfig:
    parallel = {"num_workers": 2, "sp_size": 2, "zero_stage": 3, "cpus_per_worker": 0.5}
    return PipelineConfig.model_validate({
        "name": "e2e",
        "storage_path": f"file://{tmp_path}/runs",
        "model": {"init": TINY_LLAMA, "seed": 0},
        "tokenizer": {"path": tokenizer_dir},
        "stages": [
            {
                "name": "cp_256", "kind": "pretrain", "seq_len": 256,
                "rope": {"type": "default", "theta": 40000},
                "data": {"sources": [{"name": "json_pkg", "path": f"{STDLIB}/json/*.py", "format": "text"}],
                         "token_budget": 20000, "heldout_fraction": 0.1},
                "optim": {"lr": 5e-3, "steps": 8, "warmup_steps": 1},
                "parallel": parallel, "checkpoint_every": 4,
            },
            {
                "name": "sft_512", "kind": "sft", "seq_len": 512,
                "rope": {"type": "yarn", "theta": 40000, "factor": 2.0, "original_max_position_embeddings": 256},
                "data": {"sources": [{"name": "chat", "path": sft_file, "format": "jsonl"}], "heldout_fraction": 0.2},
                "optim": {"lr": 5e-3, "steps": 8, "warmup_steps": 1},
                "parallel": parallel,
                "eval": {"filler": f"{STDLIB}/json/*.py", "lengths": [256, 512], "depths": [0.0, 1.0],
                         "per_cell": 1, "short_len": 128},
            },
        ],
    })


def write_conversations(path: str, tokenizer_dir: str, n: int = 40) -> None:
    from raylong.config import GenerateConfig
    from raylong.data.synth import generate_conversations, write_jsonl
    from raylong.data.tokenize import load_tokenizer

    rows = generate_conversations(
        GenerateConfig(task="passkey", num_examples=n, filler=f"{STDLIB}/json/*.py", context_tokens=[60, 120]),
        load_tokenizer(tokenizer_dir),
    )
    write_jsonl(rows, path)


@pytest.fixture(scope="module")
def chain(ray_cluster, tokenizer_dir, tmp_path_factory):
    """Run 1 fails on bad SFT data; run 2 (same pipeline id, data fixed) resumes. Returns what we saw."""
    from raylong.data.prepare import DataError
    from raylong.pipeline.runner import run_pipeline
    from raylong.tracking import Tracker

    tmp_path = tmp_path_factory.mktemp("e2e")
    sft_file = str(tmp_path / "chat.jsonl")
    with open(sft_file, "w") as f:
        f.write('{"messages": [\n' * 5)  # malformed JSON lines: far over the error budget
    cfg = two_stage_recipe(tmp_path, tokenizer_dir, sft_file)
    with pytest.raises(DataError) as first_error:
        run_pipeline(cfg, pipeline_id="e2e-1")
    tracking_uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    tracker = Tracker(tracking_uri)
    parent = tracker.find_pipeline("e2e-1")
    after_failure = [(r.stage, r.status) for r in tracker.stage_runs(parent)]
    export_1 = f"{tmp_path}/runs/e2e-1/stages/cp_256/export/model.safetensors"
    mtime_1 = os.path.getmtime(export_1)

    write_conversations(sft_file, tokenizer_dir)
    result = run_pipeline(cfg, pipeline_id="e2e-1")
    return {
        "cfg": cfg, "tracker": tracker, "parent": parent, "result": result, "first_error": str(first_error.value),
        "after_failure": after_failure, "export_1_mtime": (mtime_1, os.path.getmtime(export_1)),
    }


def test_bad_sft_data_stops_the_chain_before_training(chain):
    assert "records are bad" in chain["first_error"] and "chat.jsonl" in chain["first_error"]
    assert chain["after_failure"] == [("base", "FINISHED"), ("cp_256", "FINISHED"), ("sft_512", "FAILED")]


def test_rerun_skips_finished_stage_and_completes(chain):
    result, tracker = chain["result"], chain["tracker"]
    assert [(s.name, s.skipped) for s in result.stages] == [("cp_256", True), ("sft_512", False)]
    before, after = chain["export_1_mtime"]
    assert before == after, "the finished stage's export was rewritten"
    runs = tracker.stage_runs(chain["parent"])
    assert [(r.stage, r.status) for r in runs] == [("base", "FINISHED"), ("cp_256", "FINISHED"), ("sft_512", "FAILED"),
                                                   ("sft_512", "FINISHED")]  # the base was scored once
    assert tracker.client.get_run(chain["parent"]).info.status == "FINISHED"
    assert result.parent_run_id == chain["parent"]


def test_each_stage_starts_from_the_previous_export(chain):
    from raylong.train.model import export_complete

    tracker, cfg = chain["tracker"], chain["cfg"]
    finished = {r.stage: r for r in tracker.stage_runs(chain["parent"]) if r.status == "FINISHED"}
    base = export_complete(f"{cfg.storage_path}/e2e-1/assets/base_model")
    assert base is not None
    assert finished["cp_256"].tags["init_checksum"] == base["checksum"]
    assert finished["sft_512"].tags["init_checksum"] == finished["cp_256"].tags["export_checksum"]
    assert finished["sft_512"].tags["init_from"] == finished["cp_256"].export_uri


def test_loss_curves_logged_and_falling(chain):
    tracker = chain["tracker"]
    for rec in tracker.stage_runs(chain["parent"]):
        if rec.status != "FINISHED" or rec.stage == "base":
            continue
        losses = tracker.metric_history(rec.run_id, "train/loss")
        assert len(losses) == 8, rec.stage
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0], f"{rec.stage}: {losses}"
        for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s"):
            assert len(tracker.metric_history(rec.run_id, key)) == 8, key


def test_exports_load_generate_and_carry_the_stage_rope(chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracker, cfg = chain["tracker"], chain["cfg"]
    for rec in tracker.stage_runs(chain["parent"]):
        if rec.status != "FINISHED" or rec.stage == "base":
            continue
        stage = cfg.stage(rec.stage)
        path = rec.export_uri
        with open(f"{path}/config.json") as f:
            config = json.load(f)
        assert config["rope_parameters"] == stage.rope.to_hf()
        assert config["max_position_embeddings"] >= stage.seq_len
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        # the chat template the stage trained with (assistant tokens tagged) and stops at end of text / of turn
        assert "{% generation %}" in tok.chat_template.replace("{%-", "{%")
        assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")}
        ids = tok("def main():", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 6


def test_each_stage_is_evaluated_and_compared(chain):
    tracker = chain["tracker"]
    finished = {r.stage: r for r in tracker.stage_runs(chain["parent"]) if r.status == "FINISHED"}
    cp = tracker.client.get_run(finished["cp_256"].run_id).data.metrics
    sft = tracker.client.get_run(finished["sft_512"].run_id).data.metrics
    assert {"eval/heldout_loss", "eval/short_loss", "eval/loss_pos_0-64", "eval/loss_pos_128-256"} <= set(cp)
    assert 0.0 <= sft["eval/passkey_acc/256"] <= 1.0 and 0.0 <= sft["eval/passkey_acc/512"] <= 1.0
    assert "eval/heldout_loss" in sft and any(k.startswith("eval/loss_pos_") for k in sft)
    arts = {a.path for a in tracker.client.list_artifacts(finished["sft_512"].run_id, "eval")}
    assert {"eval/eval.json", "eval/passkey_heatmap.png", "eval/loss_by_position.png"} <= arts
    compare = {a.path for a in tracker.client.list_artifacts(chain["parent"], "compare")}
    assert {"compare/stages.txt", "compare/loss_curves.png", "compare/loss_by_position.png",
            "compare/passkey_heatmaps.png", "compare/retrieval_by_stage.png"} <= compare
    table = tracker.client.download_artifacts(chain["parent"], "compare/stages.txt")
    text = open(table).read()
    assert "cp_256" in text and "sft_512" in text and "512:" in text
    assert text.splitlines()[2].startswith("base "), text  # the first row: what every stage is compared with


def test_the_base_model_is_scored_before_the_first_stage_as_it_was_trained(chain, tokenizer_dir):
    """The 'base' run scores the start weights with the longest stage's retrieval suite (sft_512's lengths),
    on plain prompts and the base's own RoPE, in the workers; its grid equals a single-process evaluation
    of the base export on the same suite."""
    from raylong.eval.run import evaluate, model_forward
    from raylong.eval.suite import EvalSuite
    from raylong.train.attention import attention_for
    from raylong.train.model import load_model, rope_of

    tracker, cfg = chain["tracker"], chain["cfg"]
    base = next(r for r in tracker.stage_runs(chain["parent"]) if r.stage == "base")
    run = tracker.get_run(base.run_id)
    base_dir = f"{cfg.storage_path}/e2e-1/assets/base_model".removeprefix("file://")
    assert run.data.tags["stage_index"] == "-1" and run.data.tags["init_from"].endswith("assets/base_model")
    assert (run.data.params["kind"], run.data.params["seq_len"], run.data.params["rope.theta"]) == ("pretrain", "512",
                                                                                                    "10000.0")
    assert {"eval/passkey_acc/256", "eval/passkey_acc/512"} <= set(run.data.metrics)
    assert not any(k.startswith("train/") for k in run.data.metrics)  # nothing was trained
    summary = json.load(open(tracker.client.download_artifacts(base.run_id, "eval/eval.json")))
    suite = EvalSuite.from_json(open(f"{cfg.storage_path.removeprefix('file://')}/e2e-1/eval/base.json").read())
    assert summary["stage"] == "base" and {p.length for p in suite.passkey} == {256, 512}
    with open(f"{base_dir}/config.json") as f:
        stage = cfg.stages[-1].model_copy(update={"rope": rope_of(json.load(f))})
    model = load_model(base_dir, stage, attention_for(True, False), torch.float32).eval()
    plain = evaluate(model_forward(model), suite, [], pad_id=0)
    assert summary["passkey"] == plain["passkey"] and summary["tasks"] == plain["tasks"]


def test_final_export_is_a_registered_mlflow_model_that_mlflow_loads_and_generates(chain, monkeypatch):
    """The registered version is an MLflow model (transformers flavour): MLflow's own loaders open it by its
    models:/ URI and generate, and its weights are the last stage's export."""
    import mlflow.pyfunc
    import mlflow.transformers
    from safetensors.torch import load_file

    tracker = chain["tracker"]
    versions = tracker.client.search_model_versions("name = 'e2e-final'")
    assert len(versions) == 1
    v = versions[0]
    assert v.tags["pipeline_id"] == "e2e-1" and v.tags["recipe"] == "e2e" and v.tags["stage"] == "sft_512"
    finished = {r.stage: r for r in tracker.stage_runs(chain["parent"]) if r.status == "FINISHED"}
    assert v.run_id == finished["sft_512"].run_id and v.tags["export_uri"] == finished["sft_512"].export_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # models:/ resolves through the tracking store
    pipe = mlflow.transformers.load_model(f"models:/e2e-final/{v.version}")
    assert pipe.model.config.rope_parameters["rope_type"] == "yarn"
    export = load_file(f"{v.tags['export_uri']}/model.safetensors")
    loaded = pipe.model.state_dict()
    assert all(torch.equal(loaded[k], w) for k, w in export.items()), "registered weights differ from the export"
    text = pipe("def main():", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main():") and len(text) > len("def main():")
    predicted = mlflow.pyfunc.load_model(f"models:/e2e-final/{v.version}").predict(["def main():"])
    assert len(predicted) == 1 and isinstance(predicted[0], str) and predicted[0]
