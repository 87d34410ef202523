"""The driver -> worker contract refuses what would fail on every worker, before any worker starts."""

from __future__ import annotations

import pickle

import pytest

from raylong.config import StageConfig
from raylong.train.spec import SpecError, WorkerMode, WorkerSpec

STAGE = StageConfig.model_validate({
    "name": "s", "kind": "pretrain", "seq_len": 256,
    "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
    "optim": {"steps": 2}, "parallel": {"num_workers": 2, "sp_size": 2},
})
OK = {"stage": STAGE, "mode": WorkerMode.STAGE, "init_uri": "s3://b/base", "tokenizer_uri": "s3://b/base",
      "train_uri": "s3://b/runs/p/data/s-1/train.parquet", "export_uri": "s3://b/runs/p/stages/s/export"}


def test_a_location_that_lost_its_scheme_is_refused():
    # what prepare_stage_data used to hand over for s3:// storage: the filesystem-relative path
    with pytest.raises(SpecError, match=r"WorkerSpec.train_uri: 'b/runs/p/data/s-1/train.parquet' is neither a URI"):
        WorkerSpec(**{**OK, "train_uri": "b/runs/p/data/s-1/train.parquet"})
    WorkerSpec(**{**OK, "train_uri": "/abs/local/train.parquet"})  # absolute local paths are fine


def test_each_mode_gets_what_it_needs():
    with pytest.raises(SpecError, match="a stage run needs the location of its export"):
        WorkerSpec(**{**OK, "export_uri": None})
    with pytest.raises(SpecError, match="a sweep trial needs eval_every >= 1 and an eval_suite_uri"):
        WorkerSpec(**{**OK, "mode": WorkerMode.TRIAL, "export_uri": None})
    with pytest.raises(SpecError, match="a sweep trial writes no export"):
        WorkerSpec(**{**OK, "mode": WorkerMode.TRIAL, "eval_every": 2, "eval_suite_uri": "s3://b/e.json",
                      "heldout_uri": "s3://b/h.parquet"})
    with pytest.raises(SpecError, match="evaluation needs the held-out sequences"):
        WorkerSpec(**{**OK, "eval_suite_uri": "s3://b/e.json"})
    with pytest.raises(SpecError, match="a stage run trains and needs its packed sequences"):
        WorkerSpec(**{**OK, "train_uri": None})
    # the base model's evaluation: a suite, no training data, no held-out loss, nothing written
    base = {**OK, "mode": WorkerMode.EVAL, "train_uri": None, "export_uri": None}
    with pytest.raises(SpecError, match="an evaluation run needs an eval_suite_uri"):
        WorkerSpec(**base)
    with pytest.raises(SpecError, match="an evaluation run writes no export"):
        WorkerSpec(**{**base, "eval_suite_uri": "s3://b/e.json", "export_uri": "s3://b/x"})
    WorkerSpec(**{**base, "eval_suite_uri": "s3://b/e.json"})


def test_the_spec_travels_whole_and_never_prints_credentials():
    spec = WorkerSpec(**OK, credentials={"AWS_SECRET_ACCESS_KEY": "hunter2secret"})
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.stage.seq_len == 256 and back.credentials["AWS_SECRET_ACCESS_KEY"] == "hunter2secret"
    assert "hunter2secret" not in repr(spec)
