"""A training worker killed mid-stage: Ray Train restarts the worker group, the stage resumes from its latest
complete checkpoint (manifest written last) and finishes; the steps redone are reported and bounded."""

from __future__ import annotations

import json
import os

import pytest

from raylong.config import StageConfig
from tests.conftest import STDLIB

pytestmark = pytest.mark.slow

STEPS, EVERY, CRASH_AT = 8, 3, 5  # checkpoints after steps 3 and 6; rank 1 dies starting step index 5


def test_killed_worker_resumes_from_last_complete_checkpoint(ray_cluster, tokenizer_dir, tiny_model_dir, tmp_path):
    from raylong.data.prepare import prepare_stage_data
    from raylong.train.launch import run_training
    from raylong.train.loop import MANIFEST, StageRun
    from raylong.train.model import export_complete

    stage = StageConfig.model_validate({
        "name": "crash", "kind": "pretrain", "seq_len": 256,
        "data": {"sources": [{"name": "json_pkg", "path": f"{STDLIB}/json/*.py", "format": "text"}],
                 "token_budget": 12000, "heldout_fraction": 0.0},
        "optim": {"lr": 3e-3, "steps": STEPS}, "checkpoint_every": EVERY,
        "parallel": {"num_workers": 2, "sp_size": 2, "zero_stage": 3, "cpus_per_worker": 0.5},
        "eval": {"enabled": False},
    })
    data = prepare_stage_data(stage, tokenizer_dir, str(tmp_path / "data"))
    run = StageRun(stage=stage.model_dump(mode="json"), init_dir=tiny_model_dir, tokenizer_dir=tokenizer_dir,
                   train_path=data.train_path, export_dir=str(tmp_path / "export"), fail_at_step=CRASH_AT)
    result = run_training(stage, run, run_name="crash", storage_path=str(tmp_path / "train"), max_failures=2)

    assert result.error is None
    resumed = int(result.metrics["resumed_from_step"])
    redone = CRASH_AT - resumed
    assert resumed == 3, f"resumed from step {resumed}"
    assert 0 <= redone <= EVERY, f"{redone} steps redone, more than the checkpoint interval {EVERY}"
    assert export_complete(str(tmp_path / "export")) is not None
    with open(os.path.join(result.checkpoint.path, MANIFEST)) as f:
        assert json.load(f)["step"] == 6  # the newest checkpoint, written by the resumed attempt
