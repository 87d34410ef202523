"""Data parallel x sequence parallel x gradient accumulation: 4 gloo processes as DP 2 x SP 2 (the real
recipe is SP 8 x DP 4 with accumulation 4-8).

One optimizer step's gradient must be the mean over all of the step's learnable tokens, whichever DP group
and micro-batch holds them: a sequence with 4 learnable tokens weighs 4 tokens, not as much as one with
250. With accumulation 1 the two SP groups train on a packed and an SFT batch; with accumulation 2 each
group runs two micro-batches of very different learnable counts, also with the ALST memory switches (the
tiled loss weights its own backward). The applied SGD update must equal a
single process's update on the union of the step's sequences, for every ZeRO stage. (Before the loss used a
group-safe differentiable sum, the second SP group, which does not hold global rank 0, failed in backward:
"Global rank 0 is not part of group"; before step-level weighting, the update was the mean of per-sequence
means.)

The same processes then evaluate at DP 2 x SP 2 (ZeRO-3, ALST switches): an odd number of passkey items and
held-out rows, so one DP group runs padding forwards, scored from hidden states in tiles. The summary must
equal a single process's evaluation of the same model.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_exit, gloo_init
from tests.test_sp_exactness import ALST, make_batches, reference, stage_for

pytestmark = pytest.mark.slow

SP, DP = 2, 2
ZERO_STAGES = (1, 2, 3)
# what each DP group (SP group) trains on in its one step, by gradient-accumulation steps
GROUP_BATCHES = {1: (("packed",), ("sft",)), 2: (("packed", "sft_few"), ("sft", "packed_b"))}
# (accumulation, ZeRO stage, memory switches): every stage plain, and the ALST switches (tiled loss: its own path)
RUNS = [(ga, zero, "plain") for ga in GROUP_BATCHES for zero in ZERO_STAGES] + [(2, 1, "alst"), (2, 3, "alst")]
MEMORY = {"plain": {}, "alst": ALST}


def all_batches(vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    """make_batches' two, plus an SFT batch with 4 learnable tokens and a second packed batch."""
    batches = make_batches(vocab)
    few = {k: v.clone() for k, v in batches["sft"].items()}
    keep = torch.zeros_like(few["labels"], dtype=torch.bool)
    keep[:, 200:205] = True
    few["labels"] = torch.where(keep, few["labels"], torch.full_like(few["labels"], -100))
    other = {k: v.clone() for k, v in batches["packed"].items()}
    other["input_ids"] = 3 + (other["input_ids"] * 7) % (vocab - 3)
    other["labels"] = torch.where(other["labels"] == -100, other["labels"], other["input_ids"])
    return {**batches, "sft_few": few, "packed_b": other}


def eval_inputs(tokenizer_dir: str, vocab: int, out_dir: str) -> tuple[str, str]:
    """A passkey suite of 17 items (uneven over 2 DP groups) and 3 held-out packed rows as a Parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylong.eval.build import build_eval_suite
    from tests.test_eval import eval_stage

    suite = build_eval_suite(eval_stage("pretrain"), tokenizer_dir)
    suite.passkey = suite.passkey[:17]
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        ids = rng.integers(3, vocab, 256)
        labels = np.where(rng.random(256) < 0.8, ids, -100)
        rows.append({"input_ids": ids, "position_ids": np.r_[np.arange(100), np.arange(156)], "labels": labels})
    path = os.path.join(out_dir, "heldout.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return suite.to_json(), path


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str, suite_json: str, heldout: str) -> None:
    import torch.distributed as dist

    gloo_init(rank, world, port)
    from transformers import AutoConfig

    from raylong.eval.run import evaluate_in_workers
    from raylong.train.engine import consolidated_state_dict
    from raylong.train.step import build_stage_engine, optimizer_step

    batches = all_batches(AutoConfig.from_pretrained(model_dir).vocab_size)
    results = {}
    for ga, zero, memory in RUNS:
        stage = stage_for(zero, sp=SP, workers=world, grad_accum=ga, memory=MEMORY[memory])
        se = build_stage_engine(stage, model_dir, optimizer_cls=torch.optim.SGD)
        assert se.sp_rank == rank % SP and se.dp_size == DP  # SP groups are consecutive ranks
        shards = [next(iter(se.shard([dict(batches[case])]))) for case in GROUP_BATCHES[ga][rank // SP]]
        loss, tokens = optimizer_step(se, shards)
        state = consolidated_state_dict(se.engine, zero)
        if rank == 0:
            results[ga, zero, memory] = {"loss": loss, "tokens": tokens,
                                         "params": {k: v.detach().clone() for k, v in state.items()}}
    se = build_stage_engine(stage_for(3, sp=SP, workers=world, memory=ALST), model_dir, optimizer_cls=torch.optim.SGD)
    results["eval"] = evaluate_in_workers(se, suite_json, heldout, max_heldout=10, pad_id=0)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dp2sp2.pt"))
    dist.barrier()
    gloo_exit()


@pytest.fixture(scope="module")
def dp2sp2_results(tiny_model_dir, tokenizer_dir, tmp_path_factory):
    from transformers import AutoConfig

    out = str(tmp_path_factory.mktemp("dp2sp2"))
    world = SP * DP
    suite_json, heldout = eval_inputs(tokenizer_dir, AutoConfig.from_pretrained(tiny_model_dir).vocab_size, out)
    mp.start_processes(_worker, args=(world, free_port(), tiny_model_dir, out, suite_json, heldout), nprocs=world,
                       join=True, start_method="spawn")
    return {**torch.load(os.path.join(out, "dp2sp2.pt")), "suite": suite_json, "heldout_path": heldout}


@pytest.mark.parametrize("ga,zero,memory", RUNS, ids=[f"ga{g}-zero{z}-{m}" for g, z, m in RUNS])
def test_a_step_is_the_token_mean_over_all_its_micro_batches_and_dp_groups(dp2sp2_results, tiny_model_dir, ga, zero,
                                                                          memory):
    from transformers import AutoConfig

    batches = all_batches(AutoConfig.from_pretrained(tiny_model_dir).vocab_size)
    cases = [c for group in GROUP_BATCHES[ga] for c in group]
    refs = {case: reference(tiny_model_dir, batches[case]) for case in cases}  # (loss, tokens, before, update)
    total = sum(refs[c][1] for c in cases)
    assert max(refs[c][1] for c in cases) >= 4 * min(refs[c][1] for c in cases)  # very unequal counts
    got = dp2sp2_results[ga, zero, memory]
    assert got["tokens"] == total, (got["tokens"], total)
    want_loss = sum(refs[c][0] * refs[c][1] for c in cases) / total
    assert abs(got["loss"] - want_loss) <= 1e-5 * abs(want_loss), (got["loss"], want_loss)
    # the single-process update on the union: each sequence's mean-loss update weighted by its share of tokens
    before = refs[cases[0]][2]
    want = {k: sum(refs[c][3][k] * refs[c][1] for c in cases) / total for k in before}
    num = sum(((got["params"][k] - before[k]) - want[k]).pow(2).sum() for k in want)
    den = sum(u.pow(2).sum() for u in want.values())
    rel = float((num / den).sqrt())
    per_sequence_mean = {k: sum(refs[c][3][k] for c in cases) / len(cases) for k in before}
    old = float((sum((per_sequence_mean[k] - want[k]).pow(2).sum() for k in want) / den).sqrt())
    print(f"[figure] ZeRO-{zero} DP2xSP2 GA{ga} {memory}: update vs the token mean on one process, relative difference "
          f"{rel:.2e} (the mean of per-sequence means is {old:.2e} away)")
    assert old > 1e-2  # the two objectives differ here, so the check can tell them apart
    assert rel <= 1e-5, f"ZeRO-{zero} DP2xSP2 GA{ga} {memory} update differs from the token-mean update by {rel:.3e}"


def test_evaluation_at_dp2_sp2_equals_one_process(dp2sp2_results, tiny_model_dir):
    import numpy as np

    from raylong.eval.run import evaluate, model_forward, read_heldout
    from raylong.eval.suite import EvalSuite
    from raylong.train.attention import attention_for
    from raylong.train.model import load_model
    from tests.test_sp_exactness import ALST

    got = dp2sp2_results["eval"]
    heldout_path = dp2sp2_results["heldout_path"]
    suite = EvalSuite.from_json(dp2sp2_results["suite"])
    stage = stage_for(3, sp=SP, workers=SP * DP, memory=ALST)
    model = load_model(tiny_model_dir, stage, attention_for(True, False), torch.float32).eval()
    want = evaluate(model_forward(model), suite, read_heldout(heldout_path, 10), pad_id=0)
    assert sum(len(v) for v in got["passkey"].values()) == sum(len(v) for v in want["passkey"].values())
    assert got["passkey"] == want["passkey"]
    for key in ("heldout_loss", "short_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert set(got["loss_by_position"]) == set(want["loss_by_position"]) == {"0-64", "64-128", "128-256"}
    for bucket, value in want["loss_by_position"].items():
        assert got["loss_by_position"][bucket] == pytest.approx(value, rel=1e-5), bucket
    assert np.isfinite(got["heldout_loss"])
