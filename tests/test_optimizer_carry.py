"""carry_optimizer_state: a stage that carries the previous stage's AdamW moments takes exactly the step the
previous stage would have taken next; without carrying it takes a different one. Two gloo processes, SP=2,
ZeRO-3, through the same save/load functions the workers use."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_exit, gloo_init
from tests.test_sp_exactness import make_batches, stage_for

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:

    gloo_init(rank, world, port)
    from transformers import AutoConfig

    from raylong.train.engine import consolidated_state_dict
    from raylong.train.checkpoints import load_optimizer_state, save_optimizer_state
    from raylong.train.step import build_stage_engine, micro_step

    batch = make_batches(AutoConfig.from_pretrained(model_dir).vocab_size)["packed"]
    stage = stage_for(3, sp=world, workers=world)

    def step(se):
        micro_step(se, next(iter(se.shard([dict(batch)]))))

    def weights(se):  # collective; the full state lands on rank 0 only
        state = consolidated_state_dict(se.engine, 3)
        return {k: v.detach().clone() for k, v in state.items()} if state is not None else None

    a = build_stage_engine(stage, model_dir)  # AdamW
    step(a)
    state_dir = os.path.join(out_dir, "optimizer")
    save_optimizer_state(a.engine, state_dir, rank)
    step(a)  # what the previous stage would do next
    reference = weights(a)

    carried = build_stage_engine(stage, model_dir)
    load_optimizer_state(carried.engine, state_dir)  # weights after step 1 + AdamW moments
    step(carried)
    with_carry = weights(carried)

    restarted = build_stage_engine(stage, model_dir)  # same weights after step 1, fresh moments
    restarted.engine.load_checkpoint(state_dir, tag="final", load_module_only=True)
    step(restarted)
    without_carry = weights(restarted)
    if rank == 0:
        torch.save({"reference": reference, "with_carry": with_carry, "without_carry": without_carry},
                   os.path.join(out_dir, "carry.pt"))
    gloo_exit()


def test_carried_optimizer_state_continues_the_previous_trajectory(tiny_model_dir, tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(tmp_path / "carry.pt")
    ref, carry = got["reference"], got["with_carry"]
    diff = max(float((ref[k] - carry[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, f"carried state diverged from the continued run by {diff}"
    apart = max(float((ref[k] - got["without_carry"][k]).abs().max()) for k in ref)
    assert apart > 1e-4, "restarting the moments made no difference: the test could not tell carry from no carry"
