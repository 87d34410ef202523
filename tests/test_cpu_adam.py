"""memory.cpu_adam: the offloaded optimizer steps with DeepSpeedCPUAdam (the cpu_adam op, built here on first
use, as on a GPU node) and takes the same AdamW step as torch's, weight decay per parameter group included.
Two gloo processes, SP=2, ZeRO-3 with optimizer offload."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_exit, gloo_init
from tests.test_sp_exactness import SEQ_LEN, make_batches


def stage(cpu_adam: bool | None, use_gpu: bool = False):
    from raylong.config import StageConfig

    return StageConfig.model_validate({
        "name": "adam", "kind": "pretrain", "seq_len": SEQ_LEN,
        "data": {"sources": [{"name": "x", "path": "/dev/null", "format": "text"}]},
        "optim": {"lr": 1e-2, "steps": 2, "weight_decay": 0.5, "warmup_steps": 0, "schedule": "constant"},
        "parallel": {"num_workers": 2, "sp_size": 2, "zero_stage": 3, "use_gpu": use_gpu},
        "memory": {"offload_optimizer": True, "cpu_adam": cpu_adam},
    })


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    gloo_init(rank, world, port)
    from transformers import AutoConfig

    from raylong.train.engine import consolidated_state_dict
    from raylong.train.step import build_stage_engine, micro_step

    batches = make_batches(AutoConfig.from_pretrained(model_dir).vocab_size)
    out = {}
    for name, cpu_adam in (("torch", False), ("cpu_adam", True)):
        se = build_stage_engine(stage(cpu_adam), model_dir)
        out[f"{name}_optimizer"] = type(se.engine.optimizer.optimizer).__name__
        for batch in (batches["packed"], batches["sft"]):
            micro_step(se, next(iter(se.shard([dict(batch)]))))
        state = consolidated_state_dict(se.engine, 3)
        out[name] = {k: v.detach().clone() for k, v in state.items()} if state is not None else None
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "adam.pt"))
    gloo_exit()


@pytest.mark.slow
def test_cpu_adam_takes_torch_adamws_steps_with_decay_per_group(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    mp.start_processes(_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(tmp_path / "adam.pt")
    assert (got["torch_optimizer"], got["cpu_adam_optimizer"]) == ("AdamW", "DeepSpeedCPUAdam")
    ref, fast = got["torch"], got["cpu_adam"]
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for k in ref:
        moved = float((ref[k] - init[k]).abs().max())
        assert moved > 1e-3, f"{k} did not move: the comparison would prove nothing"
        # a norm given weight decay would differ by lr x decay x weight = 5e-3 per step
        assert torch.allclose(fast[k], ref[k], rtol=1e-5, atol=1e-6), (k, float((fast[k] - ref[k]).abs().max()))


def test_cpu_adam_is_the_default_on_gpu_and_needs_an_offloaded_optimizer():
    from raylong.config import StageConfig
    from raylong.train.engine import uses_cpu_adam

    assert uses_cpu_adam(stage(None, use_gpu=True)) and not uses_cpu_adam(stage(None, use_gpu=False))
    assert uses_cpu_adam(stage(True)) and not uses_cpu_adam(stage(False, use_gpu=True))
    bad = stage(True).model_dump()
    bad["memory"]["offload_optimizer"] = False
    with pytest.raises(ValueError, match="memory.cpu_adam steps an offloaded optimizer: it needs "
                                         "memory.offload_optimizer: true"):
        StageConfig.model_validate(bad)
