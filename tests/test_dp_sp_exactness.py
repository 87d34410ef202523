"""Data parallel x sequence parallel: 4 gloo processes as DP 2 x SP 2 (the real recipe is SP 8 x DP 4).

SP group 0 (ranks 0, 1) trains on the packed batch and SP group 1 (ranks 2, 3) on the SFT batch in the
same step; the applied SGD update must equal the data-parallel mean of the two single-process
per-sequence updates, for every ZeRO stage. Before the loss used a group-safe differentiable sum, the
second SP group (which does not hold global rank 0) failed in backward ("Global rank 0 is not part of
group").
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_exit, gloo_init
from tests.test_sp_exactness import make_batches, reference, stage_for

pytestmark = pytest.mark.slow

SP, DP = 2, 2
ZERO_STAGES = (1, 2, 3)
CASE_OF_GROUP = ("packed", "sft")  # what each DP rank (SP group) trains on


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    gloo_init(rank, world, port)
    from transformers import AutoConfig

    from raylong.train.engine import consolidated_state_dict
    from raylong.train.step import build_stage_engine, micro_step

    batches = make_batches(AutoConfig.from_pretrained(model_dir).vocab_size)
    results = {}
    for zero in ZERO_STAGES:
        se = build_stage_engine(stage_for(zero, sp=SP, workers=world), model_dir, optimizer_cls=torch.optim.SGD)
        assert se.sp_rank == rank % SP  # SP groups are consecutive ranks: DP rank = rank // SP
        shard = next(iter(se.shard([dict(batches[CASE_OF_GROUP[rank // SP]])])))
        loss, tokens = micro_step(se, shard)
        losses: list = [None] * world
        dist.all_gather_object(losses, (loss, tokens))
        state = consolidated_state_dict(se.engine, zero)
        if rank == 0:
            results[zero] = {"losses": losses, "params": {k: v.detach().clone() for k, v in state.items()}}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dp2sp2.pt"))
    gloo_exit()


@pytest.fixture(scope="module")
def dp2sp2_results(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp2sp2"))
    world = SP * DP
    mp.start_processes(_worker, args=(world, free_port(), tiny_model_dir, out), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(os.path.join(out, "dp2sp2.pt"))


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_dp2_sp2_update_equals_the_dp_mean_of_sp1_updates(dp2sp2_results, tiny_model_dir, zero):
    from transformers import AutoConfig

    batches = make_batches(AutoConfig.from_pretrained(tiny_model_dir).vocab_size)
    refs = {case: reference(tiny_model_dir, batches[case]) for case in CASE_OF_GROUP}
    got = dp2sp2_results[zero]
    for rank, (loss, tokens) in enumerate(got["losses"]):
        ref_loss, ref_tokens, _, _ = refs[CASE_OF_GROUP[rank // SP]]
        assert tokens == ref_tokens, (rank, tokens, ref_tokens)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, loss, ref_loss)
    before = refs["packed"][2]
    want = {k: (refs["packed"][3][k] + refs["sft"][3][k]) / DP for k in before}
    num = sum(((got["params"][k] - before[k]) - want[k]).pow(2).sum() for k in want)
    den = sum(u.pow(2).sum() for u in want.values())
    rel = float((num / den).sqrt())
    print(f"[figure] ZeRO-{zero} DP2xSP2: update vs DP mean of SP=1 updates, relative difference {rel:.2e}")
    assert rel <= 1e-5, f"ZeRO-{zero} DP2xSP2 update differs from the DP mean of SP=1 updates by {rel:.3e}"
