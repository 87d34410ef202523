"""Where users run, on this machine: a two-node Ray cluster (a head that runs no training, a worker node),
an S3-compatible object store and an MLflow tracking server whose artifacts live in the bucket, all started
here on loopback. The pipeline goes in through `ray job submit --working-dir`: two stages of the tiny recipe
(pretrain, then SFT) at 4 workers = DP 2 x SP 2 with evaluation, base model and corpus read from the
bucket, storage path in the bucket, one training worker SIGKILLed mid-stage. Then everything is read back
with the clients a user has: MLflow (through the server), the bucket (boto3), transformers and MLflow's
own model loaders.

Each of these broke before (issue 13): the scheme of s3:// paths handed to the workers, the SP loss at
DP > 1, MLflow artifacts in S3 without boto3, a registered model MLflow could not load, token auth on a
fresh HOME.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

import pytest
import torch
import yaml

from tests.conftest import STDLIB
from tests.prod_job import KILL_STAGE, KILL_STEP
from tests.services import REPO, LoopbackCluster, MlflowServer, S3Server, non_loopback_sockets, wait_for
from tests.test_pipeline_e2e import write_conversations

pytestmark = pytest.mark.slow

PIPELINE, MODEL_NAME = "prod-1", "prod-final"
STEPS, CHECKPOINT_EVERY = 8, 3
PARALLEL = {"num_workers": 4, "sp_size": 2, "zero_stage": 3, "cpus_per_worker": 0.5}  # DP 2 x SP 2


def recipe(bucket: str) -> dict:
    return {
        "name": "prod", "storage_path": f"{bucket}/runs", "registered_model": MODEL_NAME,
        "model": {"path": f"{bucket}/base/tiny"}, "tokenizer": {"path": f"{bucket}/base/tiny"},
        "stages": [
            {"name": "cp_512", "kind": "pretrain", "seq_len": 512, "rope": {"type": "default", "theta": 40000},
             "data": {"sources": [{"name": "json_pkg", "path": f"{bucket}/corpus/json/*.py", "format": "text"}],
                      "token_budget": 30000, "heldout_fraction": 0.1},
             "optim": {"lr": 5e-3, "steps": STEPS, "warmup_steps": 1}, "parallel": PARALLEL,
             "checkpoint_every": CHECKPOINT_EVERY, "eval": {"short_len": 128}},
            {"name": "sft_512", "kind": "sft", "seq_len": 512,
             "rope": {"type": "yarn", "theta": 40000, "factor": 2.0, "original_max_position_embeddings": 256},
             "data": {"sources": [{"name": "chat", "path": f"{bucket}/corpus/chat.jsonl", "format": "jsonl"}],
                      "heldout_fraction": 0.2},
             "optim": {"lr": 5e-3, "steps": STEPS, "warmup_steps": 1}, "parallel": PARALLEL,
             # 3 passkey items over 2 DP groups: the groups must still run the same number of forwards
             "eval": {"filler": f"{STDLIB}/json/*.py", "lengths": [512], "depths": [0.0, 0.5, 1.0], "per_cell": 1,
                      "short_len": 128}},
        ],
    }


def stage_runs(tracker) -> dict:
    parent = tracker.find_pipeline(PIPELINE)
    return {} if parent is None else {r.stage: r for r in tracker.stage_runs(parent)}


@pytest.fixture(scope="module")
def production(tokenizer_dir, tiny_model_dir, tmp_path_factory):
    from raylong.tracking import Tracker

    work = str(tmp_path_factory.mktemp("prod"))
    started, seen = [], {"sockets": []}
    try:
        s3 = S3Server(work)
        started.append(s3)
        mlflow_server = MlflowServer(work, s3)
        started.append(mlflow_server)
        cluster = LoopbackCluster(work, cpus=4)
        started.append(cluster)
        bucket = f"s3://{S3Server.BUCKET}"
        s3.upload_dir(tiny_model_dir, "base/tiny")
        s3.upload_dir(f"{STDLIB}/json", "corpus/json")
        chat = os.path.join(work, "chat.jsonl")
        write_conversations(chat, tokenizer_dir, n=60)
        s3.client().upload_file(chat, S3Server.BUCKET, "corpus/chat.jsonl")
        recipe_path = os.path.join(work, "recipe.yaml")
        with open(recipe_path, "w") as f:
            yaml.safe_dump(recipe(bucket), f)

        # what the job gets: the object store's endpoint and (dummy) keys, the tracking server
        env = {**s3.env, "MLFLOW_TRACKING_URI": mlflow_server.uri, "HF_HUB_OFFLINE": "1"}
        submission = f"raylong-{int(time.time())}"
        out = cluster.submit("--no-wait", "--submission-id", submission, "--working-dir", REPO,
                             "--runtime-env-json", json.dumps({"env_vars": env}), "--",
                             sys.executable, "-m", "tests.prod_job", "--recipe", recipe_path, "--pipeline-id", PIPELINE,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        tracker = Tracker(mlflow_server.uri)

        def job_status() -> str:
            """SUCCEEDED / FAILED / STOPPED once the job ended, else RUNNING (what `ray job status` says)."""
            out = cluster.ray("job", "status", submission)
            ended = re.search(r"Job '[^']+' (succeeded|failed|stopped)", out.stdout + out.stderr)
            return ended.group(1).upper() if ended else "RUNNING"

        def pipeline_failed() -> bool:
            parent = tracker.find_pipeline(PIPELINE)
            return parent is not None and tracker.get_run(parent).info.status == "FAILED"

        def finished() -> bool:
            # a failed pipeline ends the wait even if its driver process has not exited yet
            if job_status() != "RUNNING" or pipeline_failed():
                return True
            seen["sockets"] += non_loopback_sockets()
            return False

        wait_for(finished, 1200, "the pipeline job")
        seen["status"] = job_status()
        logs = cluster.ray("job", "logs", submission, timeout=120)
        seen["logs"] = logs.stdout + logs.stderr
        seen["sockets"] += non_loopback_sockets()
        seen["gcs_address"] = cluster.gcs_address
        yield {"s3": s3, "mlflow": mlflow_server, "tracker": tracker, "bucket": bucket, "work": work, **seen}
    finally:
        for service in reversed(started):
            service.stop()


def test_the_job_driver_joined_the_cluster_it_was_submitted_to(production):
    """Not the test session's own Ray instance on this host (Ray's "auto" address falls back to any GCS it
    finds when a node's temp dir has no bootstrap-address file; the job then ran where its working_dir was
    never uploaded)."""
    joined = re.findall(r"job driver joined the Ray cluster at (\S+)", production["logs"])
    assert joined == [production["gcs_address"]], (joined, production["gcs_address"])


def test_the_job_succeeds_and_every_stage_run_finishes(production):
    assert production["status"] == "SUCCEEDED", production["logs"][-6000:]
    tracker = production["tracker"]
    assert tracker.get_run(tracker.find_pipeline(PIPELINE)).info.status == "FINISHED"
    runs = stage_runs(tracker)
    assert {s: r.status for s, r in runs.items()} == {"base": "FINISHED", "cp_512": "FINISHED", "sft_512": "FINISHED"}
    # the base model (from the bucket) scored by the 4 workers at sft_512's length, with its own RoPE
    base = tracker.get_run(runs.pop("base").run_id).data
    assert 0.0 <= base.metrics["eval/passkey_acc/512"] <= 1.0 and base.params["rope.theta"] == "10000.0"
    for name, run in runs.items():
        losses = tracker.metric_history(run.run_id, "train/loss")
        assert len(losses) >= STEPS and all(torch.isfinite(torch.tensor(losses))), (name, losses)
        metrics = tracker.get_run(run.run_id).data.metrics
        assert "eval/heldout_loss" in metrics and "eval/short_loss" in metrics, (name, sorted(metrics))
    assert 0.0 <= tracker.get_run(runs["sft_512"].run_id).data.metrics["eval/passkey_acc/512"] <= 1.0
    assert "SP=2 x DP=2" in production["logs"]


def test_the_killed_worker_was_replaced_and_the_stage_resumed_from_the_bucket(production):
    """Rank 1 SIGKILLed itself before step 5 (tests/prod_job.py): Ray Train restarted the worker group, which
    resumed from the newest complete checkpoint in the bucket (step 3) and finished the stage."""
    runs = stage_runs(production["tracker"])
    assert KILL_STAGE == "cp_512" and "Error count: 1" in production["logs"]  # the group was restarted once
    resumed = int(runs["cp_512"].tags["resumed_from_step"])
    assert resumed == (KILL_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY == 3, resumed
    manifest = f"runs/{PIPELINE}/train/{PIPELINE}-cp_512/step_{resumed:08d}/MANIFEST.json"
    assert manifest in production["s3"].keys(f"runs/{PIPELINE}/train/"), "the resume point is not in the bucket"
    print(f"[figure] rank 1 SIGKILLed before step {KILL_STEP}: resumed from step {resumed} (checkpoint in the bucket), "
          f"{KILL_STEP - resumed} steps redone")


def test_data_checkpoints_and_exports_live_in_the_bucket(production):
    keys = production["s3"].keys(f"runs/{PIPELINE}/")
    for stage in ("cp_512", "sft_512"):
        assert any(k.startswith(f"runs/{PIPELINE}/data/{stage}-") and k.endswith("/train.parquet") for k in keys)
        assert f"runs/{PIPELINE}/stages/{stage}/export/EXPORT.json" in keys
    runs = stage_runs(production["tracker"])
    assert runs["cp_512"].export_uri == f"{production['bucket']}/runs/{PIPELINE}/stages/cp_512/export"
    assert runs["sft_512"].tags["init_from"] == runs["cp_512"].export_uri
    assert runs["sft_512"].tags["init_checksum"] == runs["cp_512"].tags["export_checksum"]
    # the SFT stage's data was prepared while cp_512 trained
    assert (runs["cp_512"].tags["data_prefetched"], runs["sft_512"].tags["data_prefetched"]) == ("False", "True")
    # the base model named by an s3:// model.path was copied once into the pipeline's storage
    assert runs["cp_512"].tags["init_from"] == f"{production['bucket']}/runs/{PIPELINE}/assets/base_model"
    assert f"runs/{PIPELINE}/assets/base_model/SOURCE.json" in keys


def test_every_export_downloaded_from_the_bucket_loads_and_generates(production):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage, run in stage_runs(production["tracker"]).items():
        if stage == "base":  # scored, not trained: it has no export of its own
            continue
        local = production["s3"].download_dir(run.export_uri, tempfile.mkdtemp(prefix=f"prod-{stage}-"))
        model, tok = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
        ids = tok("def main():", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 6, stage


def test_the_registered_model_loads_with_mlflow_through_the_server_and_generates(production, monkeypatch):
    import mlflow.transformers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", production["mlflow"].uri)
    for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)  # a user needs only the server: it proxies the bucket
    versions = production["tracker"].client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].tags["stage"] == "sft_512"
    pipe = mlflow.transformers.load_model(f"models:/{MODEL_NAME}/{versions[0].version}")
    text = pipe("def main():", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main():") and len(text) > len("def main():")
    assert any(k.endswith("/MLmodel") for k in production["s3"].keys("mlartifacts/")), "model artifacts not in the bucket"


def test_every_process_listened_and_connected_on_loopback_only(production):
    """Every connection of every process (Ray, S3, MLflow, workers) is loopback to loopback, and every listener
    is on loopback, except one: torch.distributed's TCPStore, which rank 0 of each training group opens on the
    wildcard address (torch offers no bind address; its peers reach it at MASTER_ADDR=127.0.0.1)."""
    # rank 0 of each group logged its pid and MASTER_PORT (tests/prod_job.py); a process's title is no guide:
    # it names the actor's last method call, which need not say RayTrainWorker
    stores = set(re.findall(r"TCPStore of this training group: pid (\d+) port (\d+)", production["logs"]))
    assert 3 <= len(stores) <= 4, stores  # one per training group: base, cp_512 (2 attempts), sft_512

    def is_store(sock: str) -> bool:
        m = re.match(r"pid (\d+) .*: LISTEN addr\(ip='::', port=(\d+)\)", sock)
        return m is not None and m.groups() in stores

    others = sorted(s for s in set(production["sockets"]) if not is_store(s))
    assert not others, "\n".join(others[:20])
