"""Losing work mid-stage, end to end through Ray Train (2 workers, SP=2, ZeRO-3):
1. a worker SIGKILLed mid-stage: Ray Train restarts the group, the stage resumes from its newest complete
   checkpoint, redoes at most one checkpoint interval, and ends with the weights of an uninterrupted run;
2. the newest checkpoint cut short: a rerun names it in a warning, resumes from the one before, and again
   ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import ray.cloudpickle
import torch

from raylong.config import StageConfig
from raylong.train.worker import StageWorker
from tests.conftest import STDLIB

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get the fault-injecting class by value

pytestmark = pytest.mark.slow

STEPS, EVERY, CRASH_AT = 8, 3, 5  # checkpoints after steps 3 and 6; rank 1 dies starting step index 5
WEIGHT_RTOL = 1e-5

STAGE = StageConfig.model_validate({
    "name": "crash", "kind": "pretrain", "seq_len": 256,
    "data": {"sources": [{"name": "json_pkg", "path": f"{STDLIB}/json/*.py", "format": "text"}],
             "token_budget": 12000, "heldout_fraction": 0.0},
    "optim": {"lr": 3e-3, "steps": STEPS, "warmup_steps": 2}, "checkpoint_every": EVERY,
    "parallel": {"num_workers": 2, "sp_size": 2, "zero_stage": 3, "cpus_per_worker": 0.5},
    "eval": {"enabled": False},
})


class KillRank1AtCrashStep(StageWorker):
    """Rank 1 SIGKILLs itself before step CRASH_AT, only in an attempt that did not resume."""

    def before_step(self, step: int) -> None:
        if step == CRASH_AT and self.rank == 1 and self.start_step == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def train(tiny_model_dir, tokenizer_dir, train_uri, export_dir, storage, name, worker_cls=None):
    from raylong.train.launch import run_training
    from raylong.train.spec import WorkerMode, WorkerSpec

    spec = WorkerSpec(stage=STAGE, mode=WorkerMode.STAGE, init_uri=tiny_model_dir, tokenizer_uri=tokenizer_dir,
                      train_uri=train_uri, export_uri=export_dir)
    return run_training(spec, run_name=name, storage_path=storage, max_failures=2, worker_cls=worker_cls)


def weights(export_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(export_dir, "model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.fixture(scope="module")
def reference(ray_cluster, tokenizer_dir, tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    from raylong.data.prepare import prepare_stage_data

    tmp = tmp_path_factory.mktemp("resume")
    data = prepare_stage_data(STAGE, tokenizer_dir, str(tmp / "data"))
    storage = str(tmp / "train")
    result = train(tiny_model_dir, tokenizer_dir, data.train_uri, str(tmp / "export_ref"), storage, "reference")
    assert result.error is None and int(result.metrics["resumed_from_step"]) == 0
    return {"tmp": tmp, "train_uri": data.train_uri, "storage": storage, "weights": weights(str(tmp / "export_ref"))}


def test_sigkilled_worker_resumes_and_matches_the_uninterrupted_run(reference, tokenizer_dir, tiny_model_dir):
    from raylong.train.checkpoints import MANIFEST

    tmp = reference["tmp"]
    result = train(tiny_model_dir, tokenizer_dir, reference["train_uri"], str(tmp / "export_crash"),
                   str(tmp / "train"), "crash", worker_cls=KillRank1AtCrashStep)
    assert result.error is None
    resumed = int(result.metrics["resumed_from_step"])
    redone = CRASH_AT - resumed
    assert resumed == 3, f"resumed from step {resumed}"
    assert 0 <= redone <= EVERY, f"{redone} steps redone, more than the checkpoint interval {EVERY}"
    with open(os.path.join(result.checkpoint.path, MANIFEST)) as f:
        assert json.load(f)["step"] == 6  # the newest checkpoint, written by the resumed attempt
    diff = max_relative_difference(weights(str(tmp / "export_crash")), reference["weights"])
    print(f"[figure] worker SIGKILL at step {CRASH_AT}: resumed from {resumed}, {redone} steps redone, "
          f"max relative weight difference vs uninterrupted {diff:.2e}")
    assert diff <= WEIGHT_RTOL


def test_truncated_newest_checkpoint_is_named_and_the_previous_one_used(reference, tokenizer_dir, tiny_model_dir):
    from raylong.train.checkpoints import MANIFEST

    newest = os.path.join(reference["storage"], "reference", "step_00000006")
    with open(os.path.join(newest, MANIFEST)) as f:
        files = json.load(f)["files"]
    victim = max(files, key=lambda rel: files[rel]["size"])  # the largest shard, cut in half
    with open(os.path.join(newest, victim), "r+b") as f:
        f.truncate(files[victim]["size"] // 2)

    export = str(reference["tmp"] / "export_rerun")
    result = train(tiny_model_dir, tokenizer_dir, reference["train_uri"], export, reference["storage"], "reference")
    assert result.error is None
    assert int(result.metrics["resumed_from_step"]) == 3
    warning = result.metrics["skipped_checkpoints"]
    assert "step_00000006" in warning and victim in warning and "truncated" in warning
    diff = max_relative_difference(weights(export), reference["weights"])
    print(f"[figure] truncated {victim} of step 6: resumed from 3, max relative weight difference {diff:.2e}")
    assert diff <= WEIGHT_RTOL
