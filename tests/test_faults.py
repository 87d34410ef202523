"""Faults around the pipeline driver, on a Ray head of our own (loopback, stopped by its PID):

- two pipelines with different ids run at once on the cluster; the driver of one (the process
  `ray job submit` would run: jobs/pipeline.py) is SIGKILLed during its second stage and resubmitted with
  the same id: its finished stage is not redone, the interrupted stage resumes from its newest complete
  checkpoint, and the other pipeline's directories, cache entries and MLflow runs are untouched;
- a data-stage driver SIGKILLed while the packed output is being written: the next run rebuilds it and
  gets exactly what a clean run gets;
- fake credentials in every driver's environment never appear in MLflow params, tags, artifacts, the
  storage tree, driver output or Ray's logs, while their names reach the training workers.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import STDLIB, TINY_LLAMA, free_ports

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARAYLONG" + secrets.token_hex(6).upper(),
    "AWS_SECRET_ACCESS_KEY": "raylong-secret-" + secrets.token_hex(12),
    "MLFLOW_TRACKING_PASSWORD": "raylong-password-" + secrets.token_hex(12),
    "MLFLOW_TRACKING_TOKEN": "raylong-token-" + secrets.token_hex(12),
}
CHECKPOINT_EVERY, STEPS = 2, 10


def recipe(tokenizer_dir: str, storage: str) -> dict:
    parallel = {"num_workers": 2, "sp_size": 2, "zero_stage": 3, "cpus_per_worker": 0.5}
    source = [{"name": "json_pkg", "path": f"{STDLIB}/json/*.py", "format": "text"}]
    return {
        "name": "faults", "storage_path": storage, "model": {"init": TINY_LLAMA, "seed": 0},
        "tokenizer": {"path": tokenizer_dir},
        "stages": [
            {"name": "cp_256", "kind": "pretrain", "seq_len": 256, "optim": {"lr": 3e-3, "steps": 3},
             "data": {"sources": source, "token_budget": 6000, "heldout_fraction": 0.0},
             "parallel": parallel, "eval": {"enabled": False}},
            {"name": "cp_512", "kind": "pretrain", "seq_len": 512, "optim": {"lr": 3e-3, "steps": STEPS},
             "data": {"sources": source, "token_budget": 12000, "heldout_fraction": 0.0},
             "parallel": parallel, "eval": {"enabled": False}, "checkpoint_every": CHECKPOINT_EVERY},
        ],
    }


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None or p.returncode == 0, f"{what}: a process exited with {p.returncode}"
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RayHead:
    """`ray start --head --block` on loopback with a temp dir of its own; stopped by its PID."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rlf-", dir="/tmp")
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("MLFLOW_TRACKING_URI", None)
        names = ("--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
                 "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port")
        port, *others = free_ports(len(names) + 1)
        ports = dict(zip(names, map(str, others)))
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--port={port}", f"--temp-dir={self.temp_dir}", "--num-cpus=4", "--min-worker-port=21000",
               "--max-worker-port=21999", *[f"{k}={v}" for k, v in ports.items()]]
        self.log = open(os.path.join(self.temp_dir, "head.out"), "w")
        # a fresh HOME has no ~/.ray/auth_token, and `ray start --head` (token auth on) does not create one
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{port}"
        self.env["RAY_ADDRESS"] = self.address
        wait_for(lambda: subprocess.run([RAY, "status", "--address", self.address], env=self.env,
                                        capture_output=True).returncode == 0, 90, "the Ray head", [self.proc])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_driver(head: RayHead, recipe_path: str, pipeline_id: str, log_path: str) -> subprocess.Popen:
    env = {**head.env, **SECRETS}
    out = open(log_path, "a")
    return subprocess.Popen([sys.executable, "jobs/pipeline.py", "--recipe", recipe_path, "--pipeline-id", pipeline_id],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def newest_complete_step(train_dir: str) -> int:
    import pyarrow.fs as pafs

    from raylong.train.checkpoints import scan_checkpoints

    scan = scan_checkpoints(pafs.LocalFileSystem(), train_dir)
    return scan.usable[0].step if scan.usable else 0


def settled(path: str, quiet_s: float = 8.0) -> bool:
    """True once nothing under `path` changed for quiet_s seconds (the killed driver's workers are gone)."""
    times = [os.path.getmtime(p) for p in glob.glob(f"{path}/**", recursive=True)]
    return time.time() - max(times, default=0) > quiet_s


PREPARE = r"""
import json, sys
from raylong.config import StageConfig
from raylong.data.prepare import prepare_stage_data
stage = StageConfig.model_validate(json.loads(sys.argv[1]))
for root in sys.argv[3:]:
    d = prepare_stage_data(stage, sys.argv[2], root)
    print("RESULT " + json.dumps({"root": root, "cached": d.cached, "train_path": d.train_uri,
                                  "tokens_in": d.report["tokens_in"]}), flush=True)
"""


@pytest.fixture(scope="module")
def faults(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    storage = str(tmp / "runs")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tokenizer_dir, storage)))
    logs = {k: str(tmp / f"{k}.log") for k in ("a1", "a2", "b", "data")}
    head = RayHead()
    seen: dict = {"storage": storage, "logs": logs, "ray_temp": head.temp_dir}
    try:
        # 1. A and B at once; A's driver is SIGKILLed once its second stage has a complete checkpoint
        a = start_driver(head, str(path), "pipe-a", logs["a1"])
        b = start_driver(head, str(path), "pipe-b", logs["b"])
        a_train = f"{storage}/pipe-a/train/pipe-a-cp_512"
        wait_for(lambda: newest_complete_step(a_train) >= CHECKPOINT_EVERY, 600, "pipe-a's first checkpoint", [a, b])
        a.send_signal(signal.SIGKILL)
        a.wait()
        seen["killed_at"] = time.time()
        assert b.wait(600) == 0, open(logs["b"]).read()[-3000:]
        wait_for(lambda: settled(a_train), 120, "the killed pipeline's workers to stop")
        seen["complete_step_at_resubmit"] = newest_complete_step(a_train)
        # 2. A resubmitted with the same id
        a2 = start_driver(head, str(path), "pipe-a", logs["a2"])
        assert a2.wait(600) == 0, open(logs["a2"]).read()[-3000:]

        # 3. a data-stage driver killed while its packed output is open, then a rerun and a clean reference
        from raylong.config import load_recipe

        stage = load_recipe(str(path)).stages[1].model_copy(deep=True)
        stage.data.token_budget = 150_000
        stage.data.sources[0].path = f"{STDLIB}/*.py"
        args = [sys.executable, "-c", PREPARE, stage.model_dump_json(), tokenizer_dir]
        data_root = str(tmp / "data")
        killed = subprocess.Popen(args + [data_root], cwd=REPO, env={**head.env, **SECRETS},
                                  stdout=open(logs["data"], "a"), stderr=subprocess.STDOUT)
        partial = wait_for(lambda: [p for p in glob.glob(f"{data_root}/*/train.parquet") if os.path.getsize(p) > 0],
                           300, "the packed output file", [killed])[0]
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        seen["partial"] = {"path": partial, "complete_marker": os.path.exists(os.path.join(os.path.dirname(partial),
                                                                                           "_COMPLETE.json"))}
        rerun = subprocess.run(args + [data_root, str(tmp / "data_reference"), data_root], cwd=REPO, env=head.env,
                               capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
        seen["data_runs"] = [json.loads(line[7:]) for line in rerun.stdout.splitlines() if line.startswith("RESULT ")]
    finally:
        head.stop()
    return seen


def tracker(faults):
    from raylong.tracking import Tracker

    return Tracker(f"sqlite:///{faults['storage']}/mlflow.db")


def test_driver_killed_mid_stage_resumes_without_redoing_finished_work(faults):
    t = tracker(faults)
    parent = t.find_pipeline("pipe-a")
    runs = [(r.stage, r.status) for r in t.stage_runs(parent)]
    assert runs == [("cp_256", "FINISHED"), ("cp_512", "KILLED"), ("cp_512", "FINISHED")], runs
    killed, resumed = [r for r in t.stage_runs(parent) if r.stage == "cp_512"]
    assert "driver lost" in killed.tags["interrupted"]
    resumed_from = int(resumed.tags["resumed_from_step"])
    assert resumed_from == faults["complete_step_at_resubmit"] >= CHECKPOINT_EVERY
    last_logged = len(t.metric_history(killed.run_id, "train/loss"))  # steps the killed attempt finished
    redone = last_logged - resumed_from
    assert 0 <= redone <= CHECKPOINT_EVERY
    assert len(t.metric_history(resumed.run_id, "train/loss")) == STEPS - resumed_from
    assert t.client.get_run(parent).info.status == "FINISHED"
    log_a2 = open(faults["logs"]["a2"]).read()
    assert "stage 0 cp_256: FINISHED in run" in log_a2 and "skipped" in log_a2
    print(f"[figure] driver SIGKILL during cp_512 after step {last_logged}: cp_256 not redone (1 child run), "
          f"cp_512 resumed from step {resumed_from}, {redone} steps redone (interval {CHECKPOINT_EVERY})")


def test_concurrent_pipeline_is_untouched(faults):
    from raylong.train.model import export_complete, weights_checksum

    t, storage = tracker(faults), faults["storage"]
    parents = {pid: t.find_pipeline(pid) for pid in ("pipe-a", "pipe-b")}
    b_runs = t.stage_runs(parents["pipe-b"])
    assert [(r.stage, r.status) for r in b_runs] == [("cp_256", "FINISHED"), ("cp_512", "FINISHED")]
    assert t.client.get_run(parents["pipe-b"]).info.status == "FINISHED"
    for pid, parent in parents.items():
        first_of_stage: dict = {}
        for r in t.stage_runs(parent):
            assert r.tags["pipeline_id"] == pid
            assert r.tags["data_dir"].startswith(f"{storage}/{pid}/data/")
            first_of_stage.setdefault(r.stage, r)
            if r.status == "FINISHED":
                export = r.export_uri
                assert export.startswith(f"{storage}/{pid}/stages/")
                assert weights_checksum(export) == export_complete(export)["checksum"] == r.tags["export_checksum"]
        assert all(r.tags["data_cached"] == "False" for r in first_of_stage.values())  # each built its own
    a_data = {os.path.basename(r.tags["data_dir"]) for r in t.stage_runs(parents["pipe-a"]) if "data_dir" in r.tags}
    b_data = {os.path.basename(r.tags["data_dir"]) for r in b_runs}
    assert a_data == b_data  # same recipe, same cache keys: only the per-pipeline root keeps them apart
    runs_of = {r.run_id: pid for pid, parent in parents.items() for r in t.stage_runs(parent)}
    runs_of.update({parent: pid for pid, parent in parents.items()})
    stray = []
    for path in glob.glob(f"{storage}/**", recursive=True):
        rel = os.path.relpath(path, storage)
        if os.path.isdir(path) or rel.startswith(("pipe-a/", "pipe-b/")) or rel in ("mlflow.db", "mlflow.db.lock"):
            continue
        parts = rel.split("/")  # mlartifacts/<run id>/artifacts/...
        if not (parts[0] == "mlartifacts" and len(parts) > 2 and parts[1] in runs_of):
            stray.append(rel)
    assert not stray, f"files outside the pipelines' own places: {stray}"


def test_partial_packed_output_is_never_reused(faults):
    partial, runs = faults["partial"], faults["data_runs"]
    assert not partial["complete_marker"]
    rerun, reference, again = runs
    assert not rerun["cached"] and not reference["cached"] and again["cached"]
    assert rerun["train_path"] == partial["path"]
    assert rerun["tokens_in"] == reference["tokens_in"]
    assert pq.read_table(rerun["train_path"]).equals(pq.read_table(reference["train_path"]))
    print(f"[figure] data driver SIGKILL with {partial['path']} open: rerun rebuilt it, "
          f"{pq.read_table(rerun['train_path']).num_rows} sequences equal to a clean run's")


def _mlflow_text(t) -> list[str]:
    """Every param, tag, metric name and artifact of every run, as text."""
    out = []
    for run in t.client.search_runs([t.experiment_id], max_results=1000):
        out += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()] + list(run.data.metrics)
        local = t.client.download_artifacts(run.info.run_id, "", tempfile.mkdtemp(prefix="rl-art-"))
        for path in glob.glob(f"{local}/**", recursive=True):
            if os.path.isfile(path):
                out.append(open(path, "rb").read().decode("latin-1"))
    return out


def test_credentials_never_logged_but_reach_the_workers(faults):
    places = {"mlflow": _mlflow_text(tracker(faults))}
    for root in (faults["storage"], faults["ray_temp"], os.path.dirname(faults["logs"]["b"])):
        for path in glob.glob(f"{root}/**", recursive=True):
            if os.path.isfile(path) and not os.path.islink(path):
                places.setdefault(root, []).append(open(path, "rb").read().decode("latin-1"))
    leaks = [(where, name) for where, texts in places.items() for name, value in SECRETS.items()
             if any(value in text for text in texts)]
    assert not leaks, f"credential values found in: {leaks}"
    scanned = sum(len(v) for v in places.values())
    assert scanned > 100, scanned
    log_b = open(faults["logs"]["b"]).read()
    assert "worker credentials present (names only): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in log_b
    print(f"[figure] {len(SECRETS)} credential values searched in {scanned} files/records: 0 found; names reached workers")
